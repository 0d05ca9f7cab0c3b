"""Result rows of the gradual benchmarks: one row per (method, seed, dense checkpoint), replaced when re-measured;
and the closing write of a report with its markdown table."""

from __future__ import annotations

import json
from pathlib import Path


def open_report(out: Path, settings: dict, fresh: bool = False) -> dict:
    """The report to add rows to: `out`'s rows and any other keys it holds (a hand-written `note`) unless `fresh`, with
    `settings` as given."""
    stored = {} if fresh or not out.is_file() else json.loads(out.read_text())
    return {**stored, "settings": settings, "rows": stored.get("rows", [])}


def record(report: dict, row: dict, out: Path, extra: str = "") -> None:
    """Put `row` into `report["rows"]` (replacing the same method, seed and dense checkpoint), write the file, print
    a summary line.

    Rows from another dense checkpoint (`dense_checkpoint`; absent in rows older than that field) are kept beside it."""
    report["rows"] = [r for r in report["rows"] if _key(r) != _key(row)] + [row]
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{row['method']:9s} seed {row['seed']}: sparsity {100 * row['sparsity']:.1f} %  val "
        f"{100 * row['validation']:.2f}  "
        f"test {100 * row['test']:.2f}  {row['train_seconds']:.0f} s{extra}",
        flush=True,
    )


def _key(row: dict) -> tuple:
    return row["method"], row["seed"], row.get("dense_checkpoint")


def finish_report(report: dict, out: Path, table: str) -> None:
    """Store the markdown `table` in the report, write it to `out`, print the table and where it went."""
    report["table"] = table
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    print(f"wrote {out}")

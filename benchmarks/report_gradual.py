"""Table (Markdown) and plot (PNG) from benchmarks.gradual_minilm result files (B1).

python -m benchmarks.report_gradual benchmarks/results/gradual_minilm_90.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from .common.plots import image_link, method_bars

ORDER = ("finetune", "gmp", "obd", "obert", "fls")


def by_method(path: str) -> tuple[dict, dict[str, list[dict]]]:
    data = json.loads(Path(path).read_text())
    rows: dict[str, list[dict]] = defaultdict(list)
    for row in data["rows"]:
        rows[row["method"]].append(row)
    return data["settings"], dict(sorted(rows.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def spread(values: list[float]) -> str:
    """Mean, with ± half the range when there is more than one run (seeds, or dense checkpoints)."""
    mean = 100 * float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {50 * (max(values) - min(values)):.2f}"


def finetune_seconds(rows: dict[str, list[dict]], key: str) -> dict:
    """Plain fine-tune time (`key`: train_seconds | train_cpu_seconds) per dense checkpoint (`None` for rows
    from before checkpoints were recorded)."""
    references: dict = {}
    for run in rows.get("finetune", []):
        if key in run:
            references.setdefault(run.get("dense_checkpoint"), run[key])
    return references


def time_ratio(runs: list[dict], references: dict, key: str) -> str:
    """Mean of each run's time over the fine-tune of its own dense checkpoint (the same session and machine
    load); runs on a checkpoint without a fine-tune row are left out: times of different sessions differ."""
    ratios = [
        r[key] / references[r.get("dense_checkpoint")]
        for r in runs
        if key in r and r.get("dense_checkpoint") in references
    ]
    return f"{np.mean(ratios):.2f}×" if ratios else "–"


def table(rows: dict[str, list[dict]]) -> str:
    wall, cpu = finetune_seconds(rows, "train_seconds"), finetune_seconds(rows, "train_cpu_seconds")
    lines = [
        "| method | runs | sparsity | validation | test | wall time | × fine-tune | CPU × fine-tune | peak RSS | "
        "curvature memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        seconds = float(np.mean([r["train_seconds"] for r in runs]))
        lines.append(
            f"| {name} | {len(runs)} | {100 * runs[0]['sparsity']:.1f} % | {spread([r['validation'] for r in runs])} | "
            f"{spread([r['test'] for r in runs])} | {seconds:.0f} s | {time_ratio(runs, wall, 'train_seconds')} | "
            f"{time_ratio(runs, cpu, 'train_cpu_seconds')} | {max(r['peak_rss_gib'] for r in runs):.2f} GiB | "
            f"{max(r['curvature_gib'] for r in runs):.3f} GiB |"
        )
    return "\n".join(lines)


def plot(settings: dict, rows: dict[str, list[dict]], out: Path) -> None:
    title = f"Gradual pruning to {100 * settings['sparsity']:.0f} % during {settings['epochs']} epoch(s) of fine-tuning"
    method_bars(rows, title, out)


def main() -> None:
    for path in sys.argv[1:]:
        settings, rows = by_method(path)
        print(f"### {Path(path).name}\n\n" + table(rows))
        out = Path(path).resolve().with_suffix(".png")
        plot(settings, rows, out)
        print("\n" + image_link(out, "gradual") + "\n")


if __name__ == "__main__":
    main()

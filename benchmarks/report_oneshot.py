"""Tables (Markdown) and a plot (PNG) from one or more benchmarks.oneshot_minilm result files.

    python -m benchmarks.report_oneshot benchmarks/results/oneshot_minilm.json
    python -m benchmarks.report_oneshot benchmarks/results/oneshot_minilm.json \\
        --pick obert=obert-1e-8,obert-1e-7,obert-1e-6,obert-1e-5 --plot /tmp/oneshot.png

`--pick NAME=A,B,...` adds a row NAME whose entry at each sparsity is the variant (e.g. a damping) with the best
*validation* accuracy there: how a user tuning on held-out data would choose, never on the test split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .common.paths import RESULTS

DEFAULT_PLOT = RESULTS / "oneshot_minilm.png"


def load(paths: list[str]) -> tuple[dict, list[dict]]:
    dense, methods = None, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        dense = dense or data["dense"]
        methods.extend(data["methods"])
    return dense, methods


def picked_on_validation(methods: list[dict], name: str, variants: list[str]) -> dict:
    """A row holding, per sparsity, the result of the variant with the best validation accuracy (named in `picked`)."""
    rows = {m["method"]: m for m in methods}
    missing = [v for v in variants if v not in rows]
    if missing:
        raise SystemExit(f"--pick {name}: no results for {', '.join(missing)} (have: {', '.join(rows)})")
    sparsities = sorted({s for v in variants for s in rows[v]["results"]}, key=float)
    results, seconds = {}, []
    for s in sparsities:
        best = max((v for v in variants if s in rows[v]["results"]), key=lambda v: rows[v]["results"][s]["validation"])
        results[s] = {**rows[best]["results"][s], "picked": best}
        seconds.append(rows[best]["curvature_seconds"])
    return {
        "method": name,
        "results": results,
        "curvature_seconds": max(seconds),
        "curvature_gib": max(rows[v]["curvature_gib"] for v in variants),
    }


def table(dense: dict, methods: list[dict], split: str) -> str:
    sparsities = sorted({s for m in methods for s in m["results"]}, key=float)
    head = (
        "| method | "
        + " | ".join(f"{100 * float(s):.0f} %" for s in sparsities)
        + " | curvature time | curvature memory |"
    )
    lines = [
        head,
        "|---" * (len(sparsities) + 3) + "|",
        "| dense | " + " | ".join(f"{100 * dense[split]:.2f}" for _ in sparsities) + " | – | – |",
    ]
    for m in methods:
        cells = [cell(m["results"][s], split) if s in m["results"] else "–" for s in sparsities]
        lines.append(
            f"| {m['method']} | "
            + " | ".join(cells)
            + f" | {m['curvature_seconds']:.0f} s | {m['curvature_gib']:.2f} GiB |"
        )
    return "\n".join(lines)


def cell(result: dict, split: str) -> str:
    text = f"{100 * result[split]:.2f}"
    return f"{text} ({result['picked']})" if "picked" in result else text


def plot(dense: dict, methods: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        xs = sorted(m["results"], key=float)
        fls = m["method"].startswith("fls")  # FishLeg solid, baselines dashed
        ax.plot(
            [100 * float(x) for x in xs],
            [100 * m["results"][x]["test"] for x in xs],
            color=colors[i % 20],
            linestyle="-" if fls else "--",
            marker="o" if fls else "s",
            label=m["method"],
        )
    ax.axhline(100 * dense["test"], color="black", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of the encoder linears (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("One-shot pruning of fine-tuned MiniLM, no fine-tuning after")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description="Tables and a plot from benchmarks.oneshot_minilm result files")
    parser.add_argument("results", nargs="+")
    parser.add_argument(
        "--pick",
        action="append",
        default=[],
        metavar="NAME=A,B,...",
        help="add a row NAME taking, per sparsity, the variant best on validation",
    )
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG to write (test accuracy per method)")
    args = parser.parse_args()
    dense, methods = load(args.results)
    for spec in args.pick:
        name, sep, variants = spec.partition("=")
        if not sep or not variants:
            parser.error(f"--pick {spec!r}: expected NAME=A,B,...")
        methods.append(picked_on_validation(methods, name, variants.split(",")))
    print(
        "### Test accuracy\n\n"
        + table(dense, methods, "test")
        + "\n\n### Validation accuracy (used for choices)\n\n"
        + table(dense, methods, "validation")
    )
    plot(dense, methods, args.plot)
    print(f"\n![one-shot MiniLM]({args.plot.name})")


if __name__ == "__main__":
    main()

"""Tables (Markdown) and a plot (PNG) from one or more oneshot_minilm.py result files.

    python benchmarks/report_oneshot.py benchmarks/results/oneshot_fast.json benchmarks/results/oneshot_scan.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths: list[str]) -> tuple[dict, list[dict]]:
    dense, methods = None, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        dense = dense or data["dense"]
        methods.extend(data["methods"])
    return dense, methods


def table(dense: dict, methods: list[dict], split: str) -> str:
    sparsities = sorted({s for m in methods for s in m["results"]}, key=float)
    head = "| method | " + " | ".join(f"{100 * float(s):.0f} %" for s in sparsities) + " | curvature time | curvature memory |"
    lines = [head, "|---" * (len(sparsities) + 3) + "|", f"| dense | " + " | ".join(f"{100 * dense[split]:.2f}" for _ in sparsities) + " | – | – |"]
    for m in methods:
        cells = [f"{100 * m['results'][s][split]:.2f}" if s in m["results"] else "–" for s in sparsities]
        lines.append(f"| {m['method']} | " + " | ".join(cells) + f" | {m['curvature_seconds']:.0f} s | {m['curvature_gib']:.2f} GiB |")
    return "\n".join(lines)


def plot(dense: dict, methods: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        xs = sorted(m["results"], key=float)
        fls = m["method"].startswith("fls")  # FishLeg solid, baselines dashed
        ax.plot([100 * float(x) for x in xs], [100 * m["results"][x]["test"] for x in xs], color=colors[i % 20],
                linestyle="-" if fls else "--", marker="o" if fls else "s", label=m["method"])
    ax.axhline(100 * dense["test"], color="black", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of the encoder linears (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("One-shot pruning of fine-tuned MiniLM, no fine-tuning after")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    dense, methods = load(sys.argv[1:])
    print("### Test accuracy\n\n" + table(dense, methods, "test") + "\n\n### Validation accuracy (used for choices)\n\n" + table(dense, methods, "validation"))
    out = Path(__file__).parent / "results" / "oneshot_minilm.png"
    plot(dense, methods, out)
    print(f"\n![one-shot MiniLM]({out.relative_to(Path(__file__).parent)})")


if __name__ == "__main__":
    main()

"""One plot for the gradual benchmarks: test accuracy per method (bars = mean, dots = seeds)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .paths import BENCHMARKS


def method_bars(groups: dict[str, list[dict]], title: str, out: Path, dense: float | None = None) -> None:
    """Horizontal bars, first method on top, so long scan-point names (`fls[rewarm=True]`) stay readable."""
    names = list(groups)[::-1]
    means = [100 * np.mean([r["test"] for r in groups[n]]) for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    ax.barh(
        names,
        means,
        color=["#888888" if n == "finetune" else "#1f77b4" if n.startswith("fls") else "#ff7f0e" for n in names],
    )
    for i, n in enumerate(names):
        ax.scatter([100 * r["test"] for r in groups[n]], [i] * len(groups[n]), color="black", s=12, zorder=3)
        ax.text(means[i] + 0.3, i, f"{means[i]:.1f}", va="center", fontsize=8)
    if dense is not None:
        ax.axvline(100 * dense, color="grey", linestyle="--", linewidth=1, label="dense")
        ax.legend(loc="lower right")
    ax.set_xlim(min(means) - 5, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def image_link(png: Path, alt: str) -> str:
    """Markdown image line for benchmarks/README.md: relative to benchmarks/ when the file is under it."""
    png = png.resolve()
    return f"![{alt}]({png.relative_to(BENCHMARKS) if png.is_relative_to(BENCHMARKS) else png})"

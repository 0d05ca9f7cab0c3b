"""Issue 20's summary: Markdown table and one PNG of structured pruning on MiniLM (FFN neurons, attention heads).

    python -m benchmarks.report_structured                  # → benchmarks/results/structured_minilm.png
    python -m benchmarks.report_structured --output /tmp/s.png

Reads the committed results: one-shot (no fine-tuning after pruning, `oneshot_structured_bias.json`: every rule on
one dense checkpoint, group OBS with and without the consumer's bias free) and gradual (one epoch, from the task
fine-tune and from the pre-trained model, `gradual_minilm_{50,75}_neurons[_pretrained].json`; FFN neurons and a quarter
or half of the heads together, `gradual_minilm_50_neurons+heads{25,50}_pretrained.json`, and from the task fine-tune,
`gradual_minilm_50_neurons+heads{25,50}.json`, in the table only). Group OBS's gradual runs in those files are of the
rule before session 25 ("kfac, bias not free"); the same setting's `..._bias.json` holds the shipped rule's runs
("kfac (group OBS)": the consumer's bias takes δb = −δW μ), same seeds, where it was re-run from the same start (a
re-run on another dense checkpoint is left to benchmarks/README.md's own table).
Each point is a mean over the runs a file holds (dots: the runs); the table gives validation / test and the run count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .common.paths import RESULTS
from .common.plots import image_link

ONESHOT = "oneshot_structured_bias.json"
SHIPPED, BEFORE_BIAS = "kfac (group OBS)", "kfac, bias not free"
# method names in the result files → the label a reader knows (uniform: every block keeps the same width)
ONESHOT_METHODS = {"kfac": SHIPPED, "kfac[no bias]": BEFORE_BIAS, "taylor": "Taylor", "magnitude": "magnitude"}
GRADUAL_METHODS = {
    "fls-obc-rel-uniform": BEFORE_BIAS,  # in a `_bias.json` file: SHIPPED
    "taylor-uniform": "Taylor",
    "gmp-uniform": "magnitude",
}
# neurons + heads settings, drawn on the pre-trained start's panel: suffix → (legend, marker, x offset so both show)
WITH_HEADS = {
    "_neurons+heads25_pretrained": ("+ a quarter of the heads", "D", -1.5),
    "_neurons+heads50_pretrained": ("+ half of the heads", "s", 1.5),
}
# result file suffix (after `gradual_minilm_<share>`) → (table words, panel title or None); a panel per neurons-only
# start
GRADUAL = {
    "_neurons": ("gradual neurons, from the task fine-tune", "gradual neurons, from fine-tune"),
    "_neurons_pretrained": ("gradual neurons, from the pre-trained model", "gradual neurons, from pre-trained"),
    **{
        suffix: (f"gradual neurons {legend}, from the pre-trained model", None)
        for suffix, (legend, _, _) in WITH_HEADS.items()
    },
    # table only
    "_neurons+heads25": ("gradual neurons + a quarter of the heads, from the task fine-tune", None),
    "_neurons+heads50": ("gradual neurons + half of the heads, from the task fine-tune", None),
}
SHARES = (0.5, 0.75)
COLOURS = {SHIPPED: "#1f77b4", BEFORE_BIAS: "#9ecae1", "Taylor": "#ff7f0e", "magnitude": "#7f7f7f"}


def oneshot_points(results: Path) -> tuple[dict, dict[tuple[str, str], dict[float, list[tuple[float, float]]]]]:
    """(dense {validation, test}, (kind, method label) → share → [(validation, test)]) from the one-shot file."""
    data = json.loads((results / ONESHOT).read_text())
    points: dict = {}
    for row in data["methods"]:
        kind, _, method = row["method"].partition("-")
        if method in ONESHOT_METHODS:
            by_share = points.setdefault((kind, ONESHOT_METHODS[method]), {})
            for share, result in row["results"].items():
                by_share.setdefault(float(share), []).append((result["validation"], result["test"]))
    order = list(COLOURS)
    return data["dense"], dict(
        sorted(points.items(), key=lambda item: (("neurons", "heads").index(item[0][0]), order.index(item[0][1])))
    )


def gradual_points(results: Path, suffix: str) -> tuple[list[tuple[float, float]], dict]:
    """(dense fine-tune runs [(validation, test)], method label → share → [(validation, test)]) of one `GRADUAL`
    setting; the dense runs (the same epoch with no pruning) come from the files that hold them."""
    dense, points = [], {}
    for share in SHARES:
        stem = f"gradual_minilm_{round(100 * share)}{suffix}"
        base, shipped = results / f"{stem}.json", results / f"{stem}_bias.json"
        if not base.is_file():
            continue
        rows = json.loads(base.read_text())["rows"]
        starts = {row.get("dense_checkpoint") for row in rows}
        if shipped.is_file():  # the shipped rule's runs from the same start (other checkpoints: README's own table)
            rows += [
                {**row, "method": SHIPPED}
                for row in json.loads(shipped.read_text())["rows"]
                if row["method"] == "fls-obc-rel-uniform" and row.get("dense_checkpoint") in starts
            ]
        for row in rows:
            pair = (row["validation"], row["test"])
            if row["method"] == "finetune":
                dense.append(pair)
            elif row["method"] in GRADUAL_METHODS or row["method"] == SHIPPED:
                label = GRADUAL_METHODS.get(row["method"], SHIPPED)
                points.setdefault(label, {}).setdefault(share, []).append(pair)
    order = list(COLOURS)
    return dense, dict(sorted(points.items(), key=lambda item: order.index(item[0])))


def mean_pair(runs: list[tuple[float, float]]) -> str:
    val, test = (100 * float(np.mean(v)) for v in zip(*runs))
    return f"{val:.2f} / {test:.2f} ({len(runs)})"


TABLE_SHARES = (0.5, 0.75, 0.9)


def _row(setting: str, label: str, by_share: dict) -> str:
    cells = [mean_pair(by_share[s]) if s in by_share else "–" for s in TABLE_SHARES]
    return f"| {setting} | {label} | " + " | ".join(cells) + " |"


def table(results: Path) -> str:
    """One row per method and setting, one column per share: mean validation / test (runs)."""
    lines = [
        "| setting | method | " + " | ".join(f"{100 * s:.0f} %" for s in TABLE_SHARES) + " |",
        "|---|---|" + "---|" * len(TABLE_SHARES),
    ]
    dense, oneshot = oneshot_points(results)
    blank = " |" * len(TABLE_SHARES)
    lines.append(f"| one-shot | dense: {100 * dense['validation']:.2f} / {100 * dense['test']:.2f} |{blank}")
    lines += [_row(f"one-shot, {kind}", label, by_share) for (kind, label), by_share in oneshot.items()]
    for suffix, (words, _) in GRADUAL.items():
        finetune, gradual = gradual_points(results, suffix)
        if finetune:
            lines.append(f"| {words} | dense fine-tune: {mean_pair(finetune)} |{blank}")
        lines += [_row(words, label, by_share) for label, by_share in gradual.items()]
    return "\n".join(lines)


def _panel(ax, by_label: dict, title: str, dense: float | None) -> None:
    for label, by_share in by_label.items():
        shares = sorted(by_share)
        tests = [[100 * t for _, t in by_share[s]] for s in shares]
        ax.plot([100 * s for s in shares], [np.mean(t) for t in tests], marker="o", color=COLOURS[label])
        for s, t in zip(shares, tests):
            ax.scatter([100 * s] * len(t), t, color=COLOURS[label], s=10, alpha=0.5)
    if dense is not None:
        ax.axhline(100 * dense, color="black", linestyle=":", linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("share removed (%)")
    ax.grid(alpha=0.3)


def plot(results: Path, out: Path) -> None:
    """One-shot neurons and heads, then gradual neurons from each start: test accuracy against the share removed."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8), sharey=False)
    dense, oneshot = oneshot_points(results)
    for ax, kind in zip(axes[:2], ("neurons", "heads")):
        _panel(ax, {label: s for (k, label), s in oneshot.items() if k == kind}, f"one-shot, {kind}", dense["test"])
    panels = [(suffix, title) for suffix, (_, title) in GRADUAL.items() if title]
    for ax, (suffix, title) in zip(axes[2:], panels):
        finetune, gradual = gradual_points(results, suffix)
        reference = float(np.mean([t for _, t in finetune])) if finetune else None
        _panel(ax, gradual, title, reference)
    for suffix, (_, marker, offset) in WITH_HEADS.items():
        for label, by_share in gradual_points(results, suffix)[1].items():
            for share, runs in by_share.items():
                mean = np.mean([100 * t for _, t in runs])
                axes[3].scatter(
                    [100 * share + offset], [mean], marker=marker, s=50, facecolors="none", color=COLOURS[label]
                )
    axes[0].set_ylabel("test accuracy (%)")
    handles = [plt.Line2D([], [], color=c, marker="o", label=label) for label, c in COLOURS.items()]
    handles.append(plt.Line2D([], [], color="black", linestyle=":", label="dense"))
    handles += [
        plt.Line2D([], [], color="black", marker=marker, markerfacecolor="none", linestyle="", label=legend)
        for legend, marker, _ in WITH_HEADS.values()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle("MiniLM on the movie snippets: one-shot (no fine-tuning) and gradual (one epoch); dots are runs")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    parser.add_argument("--output", type=Path, default=RESULTS / "structured_minilm.png")
    args = parser.parse_args()
    print(table(args.results))
    plot(args.results, args.output)
    print("\n" + image_link(args.output, "structured pruning on MiniLM"))


if __name__ == "__main__":
    main()

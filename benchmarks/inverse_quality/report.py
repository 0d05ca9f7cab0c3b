"""The README's Markdown tables and the plot of a finished run."""

from __future__ import annotations

from pathlib import Path

from .fishleg import KFAC_EXAMPLES


def plot(results: dict, path: Path) -> None:
    """Per damping, vs K (empirical Fisher; FishLeg's last checkpoint as horizontal lines): rel. Frobenius error,
    saliency Spearman, and the actual loss increase after pruning 50 % with joint OBS (exact OBS in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dampings = results["dampings"]
    panels = (
        ("rel_fro", "‖Q − M⁻¹‖ / ‖M⁻¹‖"),
        ("spearman", "Spearman ρ of OBS saliencies"),
        ("loss50", "loss increase, 50 % pruned"),
    )
    fig, axes = plt.subplots(len(dampings), 3, figsize=(15, 4.0 * len(dampings) + 1.6), squeeze=False)
    colors = {"full": "black", "block_diagonal": "tab:blue", "diagonal": "tab:orange", "kronecker": "tab:green"}

    def value(m: dict, metric: str) -> float:
        return m["pruning"]["0.5"]["actual"] if metric == "loss50" else m[metric]

    for row, (gamma, res) in zip(axes, dampings.items()):
        for ax, (metric, label) in zip(row, panels):
            for labels, style in (("data", "-"), ("sampled", "--")):
                for structure in ("full", "block_diagonal", "diagonal"):
                    series = res["empirical"][labels][structure]
                    ax.plot(
                        [int(k) for k in series],
                        [value(m, metric) for m in series.values()],
                        style,
                        marker="o",
                        ms=3,
                        color=colors[structure],
                        label=f"empirical Fisher, {structure}, {labels} labels",
                    )
            for key, rows in res["fishleg"].items():
                structure, init = key.split("/")
                ax.axhline(
                    value(rows[-1], metric),
                    color=colors[structure],
                    linestyle=":" if init == "identity" else "-.",
                    lw=1.6,
                    label=f"FishLeg {key} after {rows[-1]['aux_steps']} aux steps",
                )
            if metric == "loss50":
                ax.axhline(value(res["exact"], metric), color="grey", lw=3, alpha=0.5, label="exact (F + γI)⁻¹")
            ax.set_xscale("log")
            if metric != "spearman":
                ax.set_yscale("log")
            ax.set_xlabel("K (per-example gradients)")
            ax.set_ylabel(label)
            ax.set_title(f"γ = {gamma}")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    fig.suptitle(f"Inverse-Fisher quality on a {results['setup']['model']}")
    fig.tight_layout(rect=(0, 1.1 / (4.0 * len(dampings) + 1.6), 1, 1))
    fig.savefig(path, dpi=100)


def summary(results: dict) -> str:
    """The README's Markdown table per damping (a selection of the JSON's rows)."""
    setup, lines = results["setup"], []
    last = setup["aux_checkpoints"][-1]
    for gamma, res in results["dampings"].items():
        lines += [
            f"\nγ = {gamma}\n",
            "| Q | examples | ‖Q − M⁻¹‖/‖M⁻¹‖ | diag error | Spearman ρ | overlap 50 % | "
            "Δloss 30 %: own / ½δᵀFδ / actual | Δloss 50 % actual |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def row(label: str, examples: str, m: dict) -> None:
            p30, p50 = m["pruning"]["0.3"], m["pruning"]["0.5"]
            lines.append(
                f"| {label} | {examples} | {m['rel_fro']:.3f} | {m['rel_diag']:.3f} | {m['spearman']:.3f} | "
                f"{p50.get('overlap_with_exact', 1.0):.2f} | {p30['predicted_self']:.4f} / "
                f"{p30['predicted_quadratic']:.4f} / "
                f"{p30['actual']:.4f} | {p50['actual']:.4f} |"
            )

        row("exact (F + γI)⁻¹", "all (exact)", res["exact"])
        row("magnitude I/γ", "0", res["magnitude"])
        emp = res["empirical"]
        for labels, structure, ks in (
            ("sampled", "full", ("100", "1000", "10000")),
            ("data", "full", ("1000", "10000")),
            ("sampled", "layer", ("10000",)),
            ("sampled", "block_diagonal", ("100", "10000")),
            ("sampled", "diagonal", ("100", "10000")),
        ):
            for k in (k for k in ks if k in emp[labels][structure]):
                row(f"empirical {structure}, {labels} labels", f"{int(k):,} gradients", emp[labels][structure][k])
        for key in (
            "layer/aux_optimum",
            "block_diagonal/projection",
            "block_diagonal/aux_optimum",
            "diagonal/projection",
            "diagonal/aux_optimum",
            "kronecker/nearest_kronecker",
        ):
            structure, kind = key.split("/")
            label = {
                "projection": "M⁻¹ projected on",
                "aux_optimum": "aux-loss optimum,",
                "nearest_kronecker": "nearest R ⊗ L to M⁻¹,",
            }[kind]
            row(f"{label} {structure}", "all (exact)", res["references"][key])
        for key, rows in res["fishleg"].items():
            picked = rows if key.endswith("kfac") else rows[-1:]
            for m in (m for m in picked if m["aux_steps"] in (0, 1000, last)):
                examples = (KFAC_EXAMPLES if key.endswith("kfac") else 0) + m["examples_seen"]
                row(f"FishLeg {key}, {m['aux_steps']:,} aux steps", f"{examples:,} GGN", m)
    return "\n".join(lines)

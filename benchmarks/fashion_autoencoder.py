"""B3 (a): one-shot pruning of the deep autoencoder on Fashion-MNIST (the FLS paper's MNIST autoencoder study).

The classic 784-1000-500-250-30-250-500-1000-784 autoencoder (ReLU hidden units, linear 30-unit code,
sigmoid outputs read as Bernoulli probabilities of the pixel intensities) is trained once (cached in
benchmarks/cache/), then ALL eight linear layers are pruned one-shot with one global threshold to each
sparsity, by every method through the same `fls_hf` surgeon, with no retraining. Metric: reconstruction
loss = Bernoulli NLL summed over the 784 pixels, mean over images.

Every choice is made on a validation split held out of the train file, by the mean over the 50-95 %
sparsities of log validation loss: each method's damping γ (one for all sparsities); FishLeg in two stages,
γ with its K-FAC start and 0 aux steps, then the aux lr of its aux steps at that γ (both stages reported).
The test split is evaluated once per reported row. Results: benchmarks/results/fashion_autoencoder.json (+ .png).

    python -m benchmarks.fashion_autoencoder                          # every method, 7 sparsities (~13 min, 1 thread)
    python -m benchmarks.fashion_autoencoder --methods magnitude,obert@1e-3 --sparsities 0.5,0.9
    python -m benchmarks.fashion_autoencoder --quick --output /tmp/q.json   # smoke run (~20 s)
    python -m benchmarks.fashion_autoencoder --report benchmarks/results/fashion_autoencoder.json   # tables + plot
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fls_hf.curvature.fishleg import FishLegConfig
from fls_hf.fisher import CalibrationStream
from fls_hf.pruning import Pruner

from .common import fashion_data
from .common.autoencoder import batches, dense_model, reconstruction_loss
from .common.paths import RESULTS

SPARSITIES = "0.1,0.3,0.5,0.7,0.8,0.9,0.95"
BLOCK = 10  # Fisher / OBS block: divides every layer width but 784 (= 78 · 10 + 4)


def recipe(method: str, curvature: dict, **pruning) -> dict:
    """Prune every nn.Linear (targets [] = all supported layers, nothing ignored) with one global threshold."""
    return {
        "pruning": {"method": method, "targets": [], "ignore": [], "global_sparsity": True, **pruning},
        "curvature": {"likelihood": "bernoulli", **curvature},
    }


@dataclass
class Method:
    """A recipe, its damping grid (scanned on validation) and, for FishLeg, an aux-lr grid for a second stage."""

    recipe: dict
    dampings: list[float]
    aux_lrs: list[float] = field(default_factory=list)


GRADS = 2048  # per-example gradients (OBD, oBERT) = K-FAC examples (FLS) = aux-step batches: the same images
DECADES = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
FLS = {"init": "kfac", "init_examples": GRADS}
METHODS = {
    "magnitude": Method(recipe("magnitude", {}, compensation="none"), [1.0]),  # Q = I/γ: γ does not change the ranking
    "obd": Method(recipe("diagonal_fisher", {"num_grads": GRADS}, compensation="none"), [1e-4, 1e-3, 1e-2, 1e-1]),
    "obert": Method(
        recipe("block_fisher", {"num_grads": GRADS, "block_size": BLOCK}, obs_block_size=BLOCK), [1e-4, 1e-3, 1e-2]
    ),
    "fls-diag": Method(recipe("fishleg", {"structure": "diagonal", **FLS}, compensation="none"), DECADES, [1e-3, 1e-2]),
    "fls-block": Method(
        recipe("fishleg", {"structure": "block_diagonal", "block_size": BLOCK, **FLS}, obs_block_size=BLOCK),
        DECADES,
        [1e-3, 1e-2],
    ),
    # Q couples whole rows and columns: the summed single-weight update (one Q·v) uses all of it, while
    # `block` compensation would keep only its within-row blocks (worse on validation in exploration).
    "fls-kron": Method(
        recipe("fishleg", {"structure": "kronecker", **FLS}, compensation="independent"), DECADES, [1e-4, 1e-3]
    ),
}
DAMPING_FREE_STATE = ("magnitude", "diagonal_fisher")  # stored state (E[g²]) independent of γ: estimate once


def resolve(spec: str, aux_lrs: list[float] | None) -> tuple[str, Method]:
    """`name` (its damping grid) or `name@γ` (that damping only); `aux_lrs` replaces the aux-lr grid."""
    name, _, damping = spec.partition("@")
    method = copy.deepcopy(METHODS[name])
    if damping:
        method.dampings = [float(damping)]
    if aux_lrs is not None and method.aux_lrs:
        method.aux_lrs = aux_lrs
    return name, method


def configure(base: dict, args: argparse.Namespace, **curvature) -> dict:
    """`base` with calibration sizes and the given curvature keys (damping, FishLeg warm-up / aux lr)."""
    cfg = copy.deepcopy(base)
    cfg["curvature"].update({"num_batches": args.num_batches, **curvature})
    if cfg["pruning"]["method"] == "fishleg":
        cfg["curvature"]["init_examples"] = args.calibration
    return cfg


# ----------------------------------------------------------------------------- pruning
def estimate(dense: nn.Module, cfg: dict, calibration: list[dict]) -> dict:
    """Curvature estimated once on the dense model: provider state, seconds, memory (GiB)."""
    model = copy.deepcopy(dense)
    pruner = Pruner(model, cfg)
    start = time.time()
    diagnostics = pruner.provider.ready(model, CalibrationStream(calibration))
    seconds = time.time() - start
    tensors = pruner.provider.state_tensors().items()
    values = sum(
        t.numel() * t.element_size() for k, t in tensors if not k.endswith(("exp_avg", "exp_avg_sq"))
    )  # no Adam moments
    return {
        "state": pruner.provider.state_dict(),
        "seconds": seconds,
        "gib": pruner.provider.memory_bytes() / 2**30,
        "values_gib": values / 2**30,
        "diagnostics": diagnostics,
    }


def pruned(
    dense: nn.Module, cfg: dict, curvature: dict, sparsity: float, calibration: list[dict]
) -> tuple[nn.Module, dict]:
    """A copy of `dense` pruned one-shot to `sparsity` with the adopted curvature estimate."""
    model = copy.deepcopy(dense)
    pruner = Pruner(model, cfg)
    pruner.adopt_curvature(curvature["state"])
    start = time.time()
    pruner.prune_to(model, sparsity, CalibrationStream(calibration))
    seconds = time.time() - start
    layers = {name: round(pruner.masks.sparsity(name), 4) for name in pruner.layers}
    return model, {"prune_seconds": seconds, "sparsity": pruner.masks.global_sparsity(), "layer_sparsity": layers}


def losses(dense, cfg, curvature, sparsities, calibration, splits: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Loss on each of `splits` after pruning to each sparsity (one pruned copy per sparsity)."""
    out = {}
    for s in sparsities:
        model, info = pruned(dense, cfg, curvature, s, calibration)
        out[str(s)] = {**info, **{split: reconstruction_loss(model, images) for split, images in splits.items()}}
    return out


def score(results: dict[str, dict]) -> float:
    """Validation criterion: mean over the scanned sparsities of log loss (every sparsity weighs the same)."""
    return sum(math.log(r["validation"]) for r in results.values()) / len(results)


def calibration_for(cfg: dict, calibration: dict[str, list[dict]]) -> list[dict]:
    """The same calibration images, batched for FishLeg's aux steps or for per-example gradients (speed only)."""
    return calibration["fishleg" if cfg["pruning"]["method"] == "fishleg" else "grads"]


def scan(label: str, cfgs: list[dict], dense, data, calibration, sparsities) -> tuple[list[dict], tuple]:
    """Estimate + validation loss for every config; returns the scan entries and the best (entry, cfg, curvature)."""
    entries, best, shared = [], None, None
    for cfg in tqdm(cfgs, desc=f"{label} scan", leave=False):
        batches_ = calibration_for(cfg, calibration)
        if cfg["pruning"]["method"] in DAMPING_FREE_STATE:
            shared = shared or estimate(dense, cfg, batches_)
            curvature = shared
        else:
            curvature = estimate(dense, cfg, batches_)
        validation = losses(dense, cfg, curvature, sparsities, batches_, {"validation": data["validation"]})
        entry = {
            "damping": cfg["curvature"]["damping"],
            "aux_lr": cfg["curvature"].get("aux_lr"),
            "curvature_seconds": curvature["seconds"],
            "diagnostics": curvature["diagnostics"],
            "validation": {s: r["validation"] for s, r in validation.items()},
            "score": score(validation),
        }
        entries.append(entry)
        print(
            f"{label:24s} γ {entry['damping']:7.0e}"
            + (f" aux lr {entry['aux_lr']:.0e}" if entry["aux_lr"] else "")
            + "  val "
            + " ".join(f"{v:7.1f}" for v in entry["validation"].values())
            + f"  ({curvature['seconds']:.1f} s curvature)",
            flush=True,
        )
        if best is None or entry["score"] < best[0]["score"]:
            best = (entry, cfg, curvature)
    return entries, best


def final_row(
    label: str, entries: list[dict], best: tuple, dense, data, calibration, sparsities, started: float
) -> dict:
    """The chosen config pruned to every sparsity, validation and test losses."""
    entry, cfg, curvature = best
    results = losses(
        dense,
        cfg,
        curvature,
        sparsities,
        calibration_for(cfg, calibration),
        {"validation": data["validation"], "test": data["test"]},
    )
    print(
        f"{label:24s} γ {entry['damping']:7.0e}  TEST " + " ".join(f"{r['test']:7.1f}" for r in results.values()),
        flush=True,
    )
    return {
        "method": label,
        "chosen": {"damping": entry["damping"], "aux_lr": entry["aux_lr"]},
        "recipe": cfg,
        "curvature_seconds": curvature["seconds"],
        "curvature_gib": curvature["gib"],
        "curvature_values_gib": curvature["values_gib"],
        "diagnostics": curvature["diagnostics"],
        "scan": entries,
        "seconds": time.time() - started,
        "results": results,
    }


def run_method(spec: str, dense, data, calibration, sparsities, args) -> list[dict]:
    """Damping scan on validation; for FishLeg it runs with 0 aux steps (the K-FAC start), then a second
    stage runs the aux steps at that damping with each aux lr of the grid (chosen on validation too)."""
    name, method = resolve(spec, args.aux_lrs)
    scanned = [s for s in sparsities if s >= 0.5] or sparsities  # at 10-30 % every method stays near dense
    fishleg = method.recipe["pruning"]["method"] == "fishleg"
    label = f"{name} (K-FAC start)" if fishleg else name
    started = time.time()
    cfgs = [
        configure(method.recipe, args, damping=d, **({"warmup_steps": 0} if fishleg else {})) for d in method.dampings
    ]
    entries, best = scan(label, cfgs, dense, data, calibration, scanned)
    rows = [final_row(label, entries, best, dense, data, calibration, sparsities, started)]
    if fishleg and method.aux_lrs:
        started, damping = time.time(), best[0]["damping"]
        steps = (
            args.aux_steps
            if args.aux_steps is not None
            else method.recipe["curvature"].get("warmup_steps", FishLegConfig.warmup_steps)
        )
        label = f"{name} (+{steps} aux steps)"
        cfgs = [configure(method.recipe, args, damping=damping, warmup_steps=steps, aux_lr=lr) for lr in method.aux_lrs]
        entries, best = scan(label, cfgs, dense, data, calibration, scanned)
        rows.append(final_row(label, entries, best, dense, data, calibration, sparsities, started))
    return rows


# ----------------------------------------------------------------------------- report
def choice(row: dict) -> str:
    """`γ 0.01`, plus `, aux lr 0.001` for rows with aux steps."""
    chosen = row["chosen"]
    return f"γ {chosen['damping']:g}" + (
        f", aux lr {chosen['aux_lr']:g}" if chosen.get("aux_lr") and "aux steps" in row["method"] else ""
    )


def plot(report: dict, path: Path) -> None:
    """Test loss vs sparsity (left) and its increase over dense (right, symlog); one colour per method family,
    FishLeg's K-FAC-start rows thin and dotted. Needs matplotlib (skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    families = list(dict.fromkeys(m["method"].split(" ")[0] for m in report["methods"]))
    dense = report["dense"]["test"]
    for m in report["methods"]:
        xs = sorted(m["results"], key=float)
        start = "K-FAC start" in m["method"]
        style = {
            "color": f"C{families.index(m['method'].split(' ')[0])}",
            "marker": "o" if m["method"].startswith("fls") else "s",
            "markersize": 3 if start else 5,
            "linestyle": ":" if start else "-",
            "linewidth": 1 if start else 1.8,
            "label": f"{m['method']} ({choice(m)})",
        }
        losses_ = [m["results"][x]["test"] for x in xs]
        axes[0].plot([100 * float(x) for x in xs], losses_, **style)
        axes[1].plot([100 * float(x) for x in xs], [v - dense for v in losses_], **style)
    axes[0].axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    axes[0].set_ylabel("test reconstruction loss (nats / image)")
    axes[1].set_yscale("symlog", linthresh=0.1)
    axes[1].set_ylabel("increase over dense (nats / image, symlog)")
    for ax in axes:
        ax.set_xlabel("sparsity of all 8 linear layers (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("One-shot pruning of the deep autoencoder on Fashion-MNIST, no retraining (test split)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(report: dict, split: str = "test") -> str:
    """Markdown table of `split` losses with the choice, curvature time and memory of every row."""
    sparsities = sorted({s for m in report["methods"] for s in m["results"]}, key=float)
    lines = [
        "| method (choice on validation) | "
        + " | ".join(f"{100 * float(s):.0f} %" for s in sparsities)
        + " | curvature time | curvature memory |",
        "|---" * (len(sparsities) + 3) + "|",
        "| dense | " + " | ".join(f"{report['dense'][split]:.2f}" for _ in sparsities) + " | – | – |",
    ]
    for m in report["methods"]:
        cells = [f"{m['results'][s][split]:.2f}" if s in m["results"] else "–" for s in sparsities]
        lines.append(
            f"| {m['method']} ({choice(m)}) | "
            + " | ".join(cells)
            + f" | {m['curvature_seconds']:.1f} s | {m['curvature_gib']:.3f} GiB |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="B3 (a): one-shot pruning of the deep autoencoder on Fashion-MNIST")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}; name@damping skips the damping scan"
    )
    parser.add_argument("--sparsities", default=SPARSITIES)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train_batch_size", type=int, default=100)
    parser.add_argument("--validation", type=int, default=5000, help="train images held out for every choice")
    parser.add_argument("--calibration", type=int, default=GRADS, help="train images used for curvature")
    parser.add_argument("--batch_size", type=int, default=128, help="calibration batch size of FishLeg (aux steps)")
    parser.add_argument(
        "--grad_batch_size",
        type=int,
        default=8,
        help="calibration batch size of the per-example-gradient methods (same images; speed only)",
    )
    parser.add_argument(
        "--aux_steps",
        type=int,
        default=None,
        help="FishLeg aux steps of the second stage (default: the package's warmup_steps)",
    )
    parser.add_argument(
        "--aux_lrs", default=None, help="comma list replacing every FishLeg aux-lr grid; 'none' skips the second stage"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 10k train / 1k val / 1k test images, 1 epoch, 2 methods, 2 sparsities",
    )
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--report", default=None, help="print the tables of this results JSON and redraw its plot; runs nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.sparsities, args.epochs = "magnitude,fls-diag@1e-2", "0.5,0.9", 1
        args.calibration, args.aux_steps, args.aux_lrs = 256, 5, "1e-2"
    args.aux_lrs = (
        None if args.aux_lrs is None else [] if args.aux_lrs == "none" else [float(x) for x in args.aux_lrs.split(",")]
    )
    args.num_batches = math.ceil(args.calibration / args.batch_size)
    return args


def load_data(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """train / validation / test images as tensors (quick: 10,000 / 1,000 / 1,000)."""
    data = {k: torch.from_numpy(v) for k, v in fashion_data.splits(args.validation, seed=args.seed).items()}
    if args.quick:
        data = {"train": data["train"][:10000], "validation": data["validation"][:1000], "test": data["test"][:1000]}
    return data


def calibration_sets(train_images: torch.Tensor, args: argparse.Namespace) -> dict[str, list[dict]]:
    """`args.calibration` seeded train images, batched for FishLeg and for the per-example-gradient methods."""
    chosen = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed + 1))[
        : args.calibration
    ]
    return {
        "fishleg": batches(train_images[chosen], args.batch_size),
        "grads": batches(train_images[chosen], args.grad_batch_size),
    }


def report_only(path: Path) -> None:
    """Tables and plot from a finished run's JSON."""
    report = json.loads(path.read_text())
    print("### Test loss\n\n" + table(report) + "\n\n### Validation loss\n\n" + table(report, "validation"))
    plot(report, path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        return report_only(Path(args.report))
    torch.set_num_threads(1)
    started = time.time()
    data = load_data(args)
    dense, train_meta = dense_model(data["train"], args)
    calibration = calibration_sets(data["train"], args)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    report = {
        "dense": {
            "validation": reconstruction_loss(dense, data["validation"]),
            "test": reconstruction_loss(dense, data["test"]),
        },
        "training": train_meta,
        "command": " ".join(["python -m benchmarks.fashion_autoencoder", *sys.argv[1:]]),
        "settings": {
            "calibration_images": args.calibration,
            "fishleg_batch_size": args.batch_size,
            "gradient_batch_size": args.grad_batch_size,
            "aux_steps": args.aux_steps,
            "quick": args.quick,
            "threads": torch.get_num_threads(),
            "images": {k: len(v) for k, v in data.items()},
        },
        "methods": [],
    }
    print(f"dense: val {report['dense']['validation']:.2f}  test {report['dense']['test']:.2f} nats/image", flush=True)
    out = (
        Path(args.output)
        if args.output
        else RESULTS / ("fashion_autoencoder_quick.json" if args.quick else "fashion_autoencoder.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.methods.split(","):
        report["methods"].extend(run_method(spec, dense, data, calibration, sparsities, args))
        report["total_seconds"] = time.time() - started
        out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n### Test loss\n\n" + table(report) + "\n\n### Validation loss\n\n" + table(report, "validation") + "\n")
    if not args.quick:
        plot(report, out.with_suffix(".png"))
    print(f"wrote {out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()

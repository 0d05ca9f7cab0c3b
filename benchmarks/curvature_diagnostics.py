"""Issue 9: what FishLeg refinement does to each Q structure on the fine-tuned MiniLM, and what it buys.

For each structure (diagonal, Kronecker, block-diagonal) Q starts from the same K-FAC statistics (512
examples, sampled labels) and then takes `--steps` aux steps (Adam, lr `--aux_lr`) on calibration
batches of the train split. Recorded per aux step: the aux loss ½uᵀ... (its value at the step's batch
and u) and the residual ‖(F+γ)Qu − u‖/‖u‖, each measured at Q *before* that step's update, so step 1
is the K-FAC start. The table reports the mean of the first and last `--window` steps (one step's value
is noisy: one batch, one u). Accuracy without fine-tuning after one-shot pruning to each sparsity is
measured on the validation split with Q at the start and after refinement (the test split is left to B2).

    python -m benchmarks.curvature_diagnostics                    # 3 structures, 30 aux steps (~15 min)
    python -m benchmarks.curvature_diagnostics --quick --output /tmp/d.json
    python -m benchmarks.curvature_diagnostics --report benchmarks/results/curvature_diagnostics.json

Results: benchmarks/results/curvature_diagnostics.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from fls_hf.fisher import CalibrationStream
from fls_hf.pruning import Pruner

from .common import minilm
from .common.paths import RESULTS

START = {"init": "kfac", "init_examples": 512, "warmup_steps": 0, "refinement_steps": 0}
STRUCTURES = {  # compensation as in B2: what each structure's Q supports best
    "diagonal": minilm.recipe("fishleg", {"structure": "diagonal", "damping": 1e-6, **START}, compensation="none"),
    "kronecker": minilm.recipe("fishleg", {"structure": "kronecker", "damping": 1e-4, **START}, compensation="none"),
    "block_diagonal": minilm.recipe(
        "fishleg", {"structure": "block_diagonal", "block_size": 32, "damping": 1e-6, **START}, obs_block_size=32
    ),
}


def accuracies(dense, cfg: dict, state: dict, sparsities: list[float], data, calibration) -> dict[str, float]:
    """Validation accuracy after one-shot pruning of a copy of `dense` with the given provider state."""
    out = {}
    for sparsity in sparsities:
        model = copy.deepcopy(dense)
        pruner = Pruner(model, cfg)
        pruner.adopt_curvature(state)
        pruner.prune_to(model, sparsity, CalibrationStream(calibration))
        out[str(sparsity)] = minilm.accuracy(model, data["validation"])
    return out


def run_structure(name: str, dense, data, args) -> dict:
    cfg = copy.deepcopy(STRUCTURES[name])
    cfg["curvature"].update({"num_batches": args.num_batches, "aux_lr": args.aux_lr})
    if args.quick:  # the first encoder layer only, small blocks: the pipeline, not the estimate
        cfg["pruning"]["targets"] = [r"re:.*encoder\.layer\.0\..*(query|key|value|dense)$"]
        cfg["curvature"]["init_examples"] = 16
        if "block_size" in cfg["curvature"]:
            cfg["curvature"]["block_size"] = cfg["pruning"]["obs_block_size"] = 8
    calibration = list(minilm.loader(data["train"], args.batch_size, shuffle=True, seed=0))[: args.num_batches]
    model = copy.deepcopy(dense)
    pruner = Pruner(model, cfg)
    start = time.time()
    pruner.provider.ready(model, CalibrationStream(calibration))
    init_seconds = time.time() - start
    before = copy.deepcopy(pruner.provider.state_dict())  # the aux steps below update Q's tensors in place
    start_diag = {n: pruner.provider.diag(n).clone() for n in pruner.layers}
    steps, start = [], time.time()
    for k in range(args.steps):
        diagnostics = pruner.provider.update(model, calibration[k % len(calibration)])
        steps.append({"aux_loss": diagnostics["aux_loss"], "residual": diagnostics["residual"]})
        print(
            f"{name:15s} step {k + 1:3d}  aux {diagnostics['aux_loss']:.4g}  residual {diagnostics['residual']:.4g}",
            flush=True,
        )
    aux_seconds = time.time() - start
    after = pruner.provider.state_dict()
    moved = sum(float((pruner.provider.diag(n) - d).pow(2).sum()) for n, d in start_diag.items())
    change = (moved / sum(float(d.pow(2).sum()) for d in start_diag.values())) ** 0.5  # ‖Δ diag Q‖ / ‖diag Q₀‖
    row = {
        "structure": name,
        "recipe": cfg,
        "curvature_gib": pruner.provider.memory_bytes() / 2**30,
        "init_seconds": init_seconds,
        "aux_seconds_per_step": aux_seconds / max(args.steps, 1),
        "steps": steps,
        "diag_change": change,
    }
    del pruner, model
    sparsities = [float(s) for s in args.sparsities.split(",")]
    row["validation_start"] = accuracies(dense, cfg, before, sparsities, data, calibration)
    row["validation_refined"] = accuracies(dense, cfg, after, sparsities, data, calibration)
    return row


def report(path: Path) -> None:
    data = json.loads(path.read_text())
    w = data["settings"]["window"]
    sparsities = list(data["rows"][0]["validation_start"])
    head = " | ".join(f"val {100 * float(s):.0f} % start → refined" for s in sparsities)
    print(
        f"| structure | memory | residual, first {w} → last {w} steps | aux loss, first {w} → last {w} | ‖Δ diag Q‖ / "
        f"‖diag Q₀‖ | {head} |"
    )
    print("|---|---|---|---|---|" + "---|" * len(sparsities))
    for row in data["rows"]:
        first, last = row["steps"][:w], row["steps"][-w:]

        def mean(rows, key):
            return float(np.mean([r[key] for r in rows]))

        accs = " | ".join(
            f"{100 * row['validation_start'][s]:.2f} → {100 * row['validation_refined'][s]:.2f}" for s in sparsities
        )
        print(
            f"| {row['structure']} | {row['curvature_gib']:.2f} GiB | {mean(first, 'residual'):.3g} → "
            f"{mean(last, 'residual'):.3g} | "
            f"{mean(first, 'aux_loss'):.3g} → {mean(last, 'aux_loss'):.3g} | {row['diag_change']:.3g} | {accs} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="FishLeg refinement diagnostics per Q structure (MiniLM)")
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--aux_lr", type=float, default=1e-3)
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_batches", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny slices, 3 aux steps: a smoke run")
    parser.add_argument("--output", default=None)
    parser.add_argument("--report", type=Path, help="print the table of a results file")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    torch.manual_seed(0)
    data = minilm.splits()
    if args.quick:
        args.steps, args.window, args.num_batches, args.sparsities = 3, 1, 2, "0.5"
        data = {"train": data["train"].select(range(64)), "validation": data["validation"].select(range(32))}
        dense = minilm.dense_model(data, directory=minilm.QUICK_DENSE_DIR)
    else:
        dense = minilm.dense_model(data)
    out = Path(args.output) if args.output else RESULTS / "curvature_diagnostics.json"
    result = {
        "settings": {k: getattr(args, k) for k in ("steps", "window", "aux_lr", "batch_size", "num_batches", "quick")},
        "rows": [],
    }
    for name in args.structures.split(","):
        result["rows"].append(run_structure(name, dense, data, args))
        out.write_text(json.dumps(result, indent=1) + "\n")
    report(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

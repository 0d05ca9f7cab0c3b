"""B2 / issue 9: one-shot pruning of the fine-tuned MiniLM, every method through the same surgeon.

For each method the curvature is estimated once on the dense model (calibration batches from the
train split), then the dense model is pruned to each sparsity with that estimate (plus any
`recomputations`), and accuracy is measured without fine-tuning on the validation split (for tuning)
and the test split (for reporting). Results: benchmarks/results/oneshot_minilm.json (+ a PNG plot).

    python benchmarks/oneshot_minilm.py                       # all methods, 50/60/70/80 %
    python benchmarks/oneshot_minilm.py --methods magnitude,fls-kfac-block@1e-6 --sparsities 0.5,0.7
    python benchmarks/oneshot_minilm.py --quick               # smoke run: tiny slices, two methods
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import minilm  # noqa: E402

from fls_hf.pruner import Pruner  # noqa: E402
from fls_hf.calibration import CalibrationStream  # noqa: E402

RESULTS = Path(__file__).parent / "results"
method = minilm.recipe  # every method prunes the encoder linears with one global threshold

GRADS = 1024
METHODS = {
    "magnitude": method("magnitude", {}, compensation="none"),
    "obd-empirical": method("diagonal_fisher", {"num_grads": GRADS, "damping": 1e-8}, compensation="none"),
    "obd-true": method("diagonal_fisher", {"num_grads": GRADS, "fisher_labels": "sampled", "damping": 1e-8}, compensation="none"),
    "obert-1e-7": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-7}, obs_block_size=50),
    "obert-1e-6": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-6}, obs_block_size=50),
    "obert-1e-5": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-5}, obs_block_size=50),
    # the same block OBS from the true Fisher: labels drawn from the model, or its exact expectation over the 2 classes
    # (`expected`: 512 examples × 2 class passes = the same 1,024 gradient vectors)
    "obert-sampled": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-6, "fisher_labels": "sampled"},
                            obs_block_size=50),
    "obert-expected": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-6, "fisher_labels": "expected"},
                             obs_block_size=50),
    "obd-expected": method("diagonal_fisher", {"num_grads": GRADS, "fisher_labels": "expected", "damping": 1e-8}, compensation="none"),
    "fls-kfac-diag": method("fishleg", {"structure": "diagonal", "init": "kfac", "init_examples": 512, "warmup_steps": 0,
                                        "damping": 1e-8}, compensation="none"),
    "fls-kfac-block": method("fishleg", {"structure": "block_diagonal", "block_size": 32, "init": "kfac", "init_examples": 512,
                                         "warmup_steps": 0, "damping": 1e-8}, obs_block_size=32),
    "fls-kfac-block-aux": method("fishleg", {"structure": "block_diagonal", "block_size": 32, "init": "kfac", "init_examples": 512,
                                             "warmup_steps": 60, "aux_lr": 1e-3, "aux_lr_schedule": "linear", "damping": 1e-6},
                                 obs_block_size=32),
    "fls-kfac-block-rec4": method("fishleg", {"structure": "block_diagonal", "block_size": 32, "init": "kfac", "init_examples": 512,
                                              "warmup_steps": 0, "refinement_steps": 10, "aux_lr": 1e-3, "damping": 1e-6,
                                              "rewarm": False}, obs_block_size=32, recomputations=4),
    # Q₀ from the exact true Fisher's blocks (oBERT's inverse without the empirical-Fisher bias), then refined
    "fls-fisher-block": method("fishleg", {"structure": "block_diagonal", "block_size": 50, "init": "fisher", "init_labels": "expected",
                                           "init_examples": GRADS, "warmup_steps": 0, "refinement_steps": 0, "damping": 1e-6},
                               obs_block_size=50),
    "fls-fisher-block-aux": method("fishleg", {"structure": "block_diagonal", "block_size": 50, "init": "fisher", "init_labels": "expected",
                                               "init_examples": GRADS, "warmup_steps": 20, "refinement_steps": 0, "aux_lr": 1e-3,
                                               "damping": 1e-6}, obs_block_size=50),
    "fls-fisher-block-rec4": method("fishleg", {"structure": "block_diagonal", "block_size": 50, "init": "fisher", "init_labels": "expected",
                                                "init_examples": GRADS, "warmup_steps": 0, "refinement_steps": 10, "aux_lr": 1e-3,
                                                "damping": 1e-6, "rewarm": False}, obs_block_size=50, recomputations=4),
    # OBD saliency (Fisher diagonal read off Q's blocks: the Kronecker diagonal G_ii Ā_jj + γ for a K-FAC start)
    # with the joint block OBS update — the strongest saliency with oBERT's compensation
    "fls-kfac-block-obd": method("fishleg", {"structure": "block_diagonal", "block_size": 50, "init": "kfac", "init_examples": 512,
                                             "warmup_steps": 0, "refinement_steps": 0, "damping": 1e-6},
                                 obs_block_size=50, saliency="obd"),
    "obert-obd": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-6}, obs_block_size=50, saliency="obd"),
    "fls-kfac-kron": method("fishleg", {"structure": "kronecker", "init": "kfac", "init_examples": 512, "warmup_steps": 0,
                                        "damping": 1e-4}, compensation="none"),
}


def resolve(name: str) -> dict:
    """`method` or `method@damping` (a damping variant, for scans on the validation split)."""
    base, _, damping = name.partition("@")
    recipe = copy.deepcopy(METHODS[base])
    if damping:
        recipe["curvature"]["damping"] = float(damping)
    return recipe


def calibration(data, batch_size: int, limit: int | None):
    dataset = data["train"] if limit is None else data["train"].select(range(limit))
    return minilm.loader(dataset, batch_size, shuffle=True, seed=0)


def run_method(name: str, recipe: dict, dense, data, sparsities, args) -> dict:
    cfg = copy.deepcopy(recipe)
    cfg["curvature"].setdefault("num_batches", args.num_batches)
    estimator_model = copy.deepcopy(dense)
    estimator = Pruner(estimator_model, cfg)
    start = time.time()
    diagnostics = estimator.provider.prepare(estimator_model, CalibrationStream(calibration(data, args.batch_size, args.calibration_limit)))
    curvature_s = time.time() - start
    state = estimator.provider.state_dict()
    # FishLeg: aux loss and residual ‖(F+γ)Qu − u‖/‖u‖ of the last warm-up step; baselines: examples used
    row = {"method": name, "recipe": cfg, "curvature_seconds": curvature_s,
           "curvature_gib": estimator.provider.memory_bytes() / 2**30, "curvature_diagnostics": diagnostics, "results": {}}
    del estimator, estimator_model
    for sparsity in sparsities:
        model = copy.deepcopy(dense)
        pruner = Pruner(model, cfg)
        pruner.adopt_curvature(state)
        start = time.time()
        pruner.prune_to(model, sparsity, CalibrationStream(calibration(data, args.batch_size, args.calibration_limit)))
        row["results"][str(sparsity)] = {
            "prune_seconds": time.time() - start, "sparsity": pruner.masks.global_sparsity(),
            "validation": minilm.accuracy(model, data["validation"]), "test": minilm.accuracy(model, data["test"]),
        }
        print(f"{name:18s} {100 * sparsity:4.0f} %  val {100 * row['results'][str(sparsity)]['validation']:.2f}  "
              f"test {100 * row['results'][str(sparsity)]['test']:.2f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description="One-shot pruning of the fine-tuned MiniLM")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_batches", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    args.calibration_limit = None
    torch.manual_seed(0)
    data = minilm.splits()
    if args.quick:
        args.methods, args.sparsities, args.num_batches, args.calibration_limit = "magnitude,fls-kfac-diag", "0.5", 2, 16
        data = {"train": data["train"], "validation": data["validation"].select(range(64)), "test": data["test"].select(range(64))}
    if args.quick:  # a smoke model, cached apart from the real one
        dense = minilm.dense_model({"train": data["train"].select(range(64))}, directory=minilm.QUICK_DENSE_DIR)
    else:
        dense = minilm.dense_model(data)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    report = {"dense": {"validation": minilm.accuracy(dense, data["validation"]), "test": minilm.accuracy(dense, data["test"])},
              "settings": {"batch_size": args.batch_size, "num_batches": args.num_batches, "max_length": minilm.MAX_LENGTH},
              "methods": []}
    print(f"dense: val {100 * report['dense']['validation']:.2f}  test {100 * report['dense']['test']:.2f}", flush=True)
    out = Path(args.output) if args.output else RESULTS / ("oneshot_minilm_quick.json" if args.quick else "oneshot_minilm.json")
    for name in args.methods.split(","):
        report["methods"].append(run_method(name, resolve(name), dense, data, sparsities, args))
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

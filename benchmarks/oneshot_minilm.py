"""B2 / issue 9: one-shot pruning of the fine-tuned MiniLM, every method through the same surgeon.

For each method the curvature is estimated once on the dense model (calibration batches from the
train split), then the dense model is pruned to each sparsity with that estimate (plus any
`recomputations`), and accuracy is measured without fine-tuning on the validation split (for tuning)
and the test split (for reporting). Results: benchmarks/results/oneshot_minilm.json (+ a PNG plot).

    python -m benchmarks.oneshot_minilm                       # all methods, 50/60/70/80 %
    python -m benchmarks.oneshot_minilm --methods magnitude,fls-kfac-block@1e-6 --sparsities 0.5,0.7
    python -m benchmarks.oneshot_minilm --quick               # smoke run: tiny slices, two methods
    python -m benchmarks.oneshot_minilm --peers               # + llm-compressor's SparseGPT / Wanda, same run and file

`--peers` runs `python -m benchmarks.peers.llmcompressor_oneshot` after the fls_hf methods (never beside them:
they would share the CPU) with the peers' own interpreter (default benchmarks/.venv-peers/bin/python; that
module's docstring says how to make it) on the same dense checkpoint, split and sparsities, and appends its rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fls_hf import load_recipe
from fls_hf.fisher import CalibrationStream
from fls_hf.pruning import Pruner

from .common import minilm
from .common.overrides import quick_curvature
from .common.paths import BENCHMARKS, REPO, RESULTS

PEERS_MODULE = "benchmarks.peers.llmcompressor_oneshot"
PEERS_PYTHON = BENCHMARKS / ".venv-peers" / "bin" / "python"
method = minilm.recipe  # every method prunes the encoder linears with one global threshold

GRADS = 1024
DEFAULT_RECIPE = REPO / "recipes" / "oneshot-unstructured-50.yaml"


def default_recipe() -> dict:
    """The shipped one-shot recipe as a user gets it, aimed at the harness's encoder linears and 98 % layer cap."""
    cfg = load_recipe(DEFAULT_RECIPE).to_dict()
    harness = method(cfg["pruning"]["method"], {})["pruning"]
    cfg["pruning"].update({key: harness[key] for key in ("targets", "ignore", "global_sparsity", "max_layer_sparsity")})
    return cfg


METHODS = {
    "magnitude": method("magnitude", {}, compensation="none"),
    "obd-empirical": method("diagonal_fisher", {"num_grads": GRADS, "damping": 1e-8}, compensation="none"),
    "obd-empirical-512": method("diagonal_fisher", {"num_grads": 512, "damping": 1e-8}, compensation="none"),
    "obd-true": method(
        "diagonal_fisher", {"num_grads": GRADS, "fisher_labels": "sampled", "damping": 1e-8}, compensation="none"
    ),
    "obert-1e-8": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-8}, obs_block_size=50),
    "obert-1e-7": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-7}, obs_block_size=50),
    "obert-1e-6": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-6}, obs_block_size=50),
    "obert-1e-5": method("block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-5}, obs_block_size=50),
    # oBERT with the recomputations the FLS default uses (1,024 fresh gradients before each of 4 stages)
    "obert-1e-6-rec4": method(
        "block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-6}, obs_block_size=50, recomputations=4
    ),
    # the same block OBS from the true Fisher: labels drawn from the model, or its exact expectation over the 2 classes
    # (`expected`: 512 examples × 2 class passes = the same 1,024 gradient vectors)
    "obert-sampled": method(
        "block_fisher",
        {"num_grads": GRADS, "block_size": 50, "damping": 1e-6, "fisher_labels": "sampled"},
        obs_block_size=50,
    ),
    "obert-expected": method(
        "block_fisher",
        {"num_grads": GRADS, "block_size": 50, "damping": 1e-6, "fisher_labels": "expected"},
        obs_block_size=50,
    ),
    "obd-expected": method(
        "diagonal_fisher", {"num_grads": GRADS, "fisher_labels": "expected", "damping": 1e-8}, compensation="none"
    ),
    "fls-kfac-diag": method(
        "fishleg",
        {"structure": "diagonal", "init": "kfac", "init_examples": 512, "warmup_steps": 0, "damping": 1e-8},
        compensation="none",
    ),
    "fls-kfac-block": method(
        "fishleg",
        {
            "structure": "block_diagonal",
            "block_size": 32,
            "init": "kfac",
            "init_examples": 512,
            "warmup_steps": 0,
            "damping": 1e-8,
        },
        obs_block_size=32,
    ),
    "fls-kfac-block-aux": method(
        "fishleg",
        {
            "structure": "block_diagonal",
            "block_size": 32,
            "init": "kfac",
            "init_examples": 512,
            "warmup_steps": 60,
            "aux_lr": 1e-3,
            "aux_lr_schedule": "linear",
            "damping": 1e-6,
        },
        obs_block_size=32,
    ),
    "fls-kfac-block-rec4": method(
        "fishleg",
        {
            "structure": "block_diagonal",
            "block_size": 32,
            "init": "kfac",
            "init_examples": 512,
            "warmup_steps": 0,
            "refinement_steps": 10,
            "aux_lr": 1e-3,
            "damping": 1e-6,
            "rewarm": False,
        },
        obs_block_size=32,
        recomputations=4,
    ),
    # Q₀ from the exact true Fisher's blocks (oBERT's inverse without the empirical-Fisher bias), then refined
    "fls-fisher-block": method(
        "fishleg",
        {
            "structure": "block_diagonal",
            "block_size": 50,
            "init": "fisher",
            "init_labels": "expected",
            "init_examples": GRADS,
            "warmup_steps": 0,
            "refinement_steps": 0,
            "damping": 1e-6,
        },
        obs_block_size=50,
    ),
    "fls-fisher-block-aux": method(
        "fishleg",
        {
            "structure": "block_diagonal",
            "block_size": 50,
            "init": "fisher",
            "init_labels": "expected",
            "init_examples": GRADS,
            "warmup_steps": 20,
            "refinement_steps": 0,
            "aux_lr": 1e-3,
            "damping": 1e-6,
        },
        obs_block_size=50,
    ),
    "fls-fisher-block-rec4": method(
        "fishleg",
        {
            "structure": "block_diagonal",
            "block_size": 50,
            "init": "fisher",
            "init_labels": "expected",
            "init_examples": GRADS,
            "warmup_steps": 0,
            "refinement_steps": 10,
            "aux_lr": 1e-3,
            "damping": 1e-6,
            "rewarm": False,
        },
        obs_block_size=50,
        recomputations=4,
    ),
    # OBD saliency (Fisher diagonal read off Q's blocks: the Kronecker diagonal G_ii Ā_jj + γ for a K-FAC start)
    # with the joint block OBS update — the strongest saliency with oBERT's compensation
    "fls-kfac-block-obd": method(
        "fishleg",
        {
            "structure": "block_diagonal",
            "block_size": 50,
            "init": "kfac",
            "init_examples": 512,
            "warmup_steps": 0,
            "refinement_steps": 0,
            "damping": 1e-6,
        },
        obs_block_size=50,
        saliency="obd",
    ),
    "obert-obd": method(
        "block_fisher", {"num_grads": GRADS, "block_size": 50, "damping": 1e-6}, obs_block_size=50, saliency="obd"
    ),
    "fls-kfac-kron": method(
        "fishleg",
        {"structure": "kronecker", "init": "kfac", "init_examples": 512, "warmup_steps": 0, "damping": 1e-4},
        compensation="none",
    ),
    # the "same, independent compensation δW = −Q(1_P ⊙ W / diag Q)" (kept to show why it is not the default)
    "fls-kfac-kron-independent": method(
        "fishleg",
        {"structure": "kronecker", "init": "kfac", "init_examples": 512, "warmup_steps": 0, "damping": 1e-4},
        compensation="independent",
    ),
    # K-FAC start re-taken on the pruned model before each of 4 stages (`rewarm`), no aux steps: oBERT-style
    # recomputation at 4 × 12 s of statistics, still below one 1,024-gradient pass
    "fls-kfac-diag-rewarm4": method(
        "fishleg",
        {
            "structure": "diagonal",
            "init": "kfac",
            "init_examples": 512,
            "warmup_steps": 0,
            "refinement_steps": 0,
            "rewarm": True,
            "damping": 1e-6,
        },
        compensation="none",
        recomputations=4,
    ),
    "fls-kfac-block-rewarm4": method(
        "fishleg",
        {
            "structure": "block_diagonal",
            "block_size": 32,
            "init": "kfac",
            "init_examples": 512,
            "warmup_steps": 0,
            "refinement_steps": 0,
            "rewarm": True,
            "damping": 1e-6,
        },
        obs_block_size=32,
        recomputations=4,
    ),
    "fls-default": default_recipe(),
    # issue 17: K-FAC row model (row i: G_ii Ā + γI), exact joint OBS inside each row, one global threshold
    "kfac-obc": method("kfac", {"num_examples": 512, "damping": 1e-6, "damping_mode": "absolute"}, compensation="obc"),
    "kfac-obc-rec4": method(
        "kfac", {"num_examples": 512, "damping": 1e-6, "damping_mode": "absolute"}, compensation="obc", recomputations=4
    ),
    # the same statistics, the pruned set chosen in 4 / 8 rounds that re-rank the survivors given the pruned weights
    "kfac-obc-r4": method(
        "kfac", {"num_examples": 512, "damping": 1e-6, "damping_mode": "absolute"}, compensation="obc", obc_rounds=4
    ),
    "kfac-obc-r8": method(
        "kfac", {"num_examples": 512, "damping": 1e-6, "damping_mode": "absolute"}, compensation="obc", obc_rounds=8
    ),
    # the kfac default damping: γ = 1e-2 × the mean K-FAC Fisher diagonal (≈ 4.4e-7 on this checkpoint)
    "kfac-obc-r4-rel": method("kfac", {"num_examples": 512, "damping": 1e-2}, compensation="obc", obc_rounds=4),
    # the same with 1,024 calibration examples: oBERT's budget (GRADS per-example gradients)
    "kfac-obc-r4-rel-1024": method(
        "kfac", {"num_examples": 1024, "num_batches": 128, "damping": 1e-2}, compensation="obc", obc_rounds=4
    ),
    # the sweep solver (SparseGPT's column sweep with adaptive masks, one factor per layer; issue 18's cost)
    "kfac-obc-sweep-r4-rel": method(
        "kfac", {"num_examples": 512, "damping": 1e-2}, compensation="obc", obc_rounds=4, obc_solver="sweep"
    ),
    # K-FAC statistics from the data labels (oBERT's empirical Fisher: ahead of its true-Fisher variants here)
    "kfac-obc-emp": method(
        "kfac",
        {"num_examples": 512, "damping": 1e-6, "damping_mode": "absolute", "fisher_labels": "empirical"},
        compensation="obc",
    ),
    "kfac-obc-emp-1024": method(
        "kfac",
        {"num_examples": 1024, "damping": 1e-6, "damping_mode": "absolute", "fisher_labels": "empirical"},
        compensation="obc",
    ),
    "kfac-obc-r4-emp": method(
        "kfac",
        {"num_examples": 512, "damping": 1e-6, "damping_mode": "absolute", "fisher_labels": "empirical"},
        compensation="obc",
        obc_rounds=4,
    ),
}
# issue 20: whole FFN neurons / attention heads, the same share in every block (`--sparsities` are shares of them),
# 512 calibration examples each: group OBS (kfac, true- and empirical-label statistics), group magnitude, Taylor
for _kind in ("neurons", "heads"):
    _structure = {"mask_type": _kind, "global_sparsity": False}
    METHODS[f"{_kind}-kfac"] = method("kfac", {"num_examples": 512, "damping": 1e-2}, **_structure)
    METHODS[f"{_kind}-kfac-emp"] = method(
        "kfac", {"num_examples": 512, "damping": 1e-2, "fisher_labels": "empirical"}, **_structure
    )
    METHODS[f"{_kind}-magnitude"] = method("magnitude", {}, **_structure)
    METHODS[f"{_kind}-taylor"] = method("taylor", {}, **_structure)


def resolve(name: str) -> dict:
    """`method` or `method@damping` (a damping variant, for scans on the validation split)."""
    base, _, damping = name.partition("@")
    recipe = copy.deepcopy(METHODS[base])
    if damping:
        recipe["curvature"]["damping"] = float(damping)
    return recipe


def calibration(data, batch_size: int, limit: int | None, seed: int = 0):
    dataset = data["train"] if limit is None else data["train"].select(range(limit))
    return minilm.loader(dataset, batch_size, shuffle=True, seed=seed)


def run_method(name: str, recipe: dict, dense, data, sparsities, args) -> dict:
    cfg = copy.deepcopy(recipe)
    cfg["curvature"].setdefault("num_batches", args.num_batches)
    estimator_model = copy.deepcopy(dense)
    estimator = Pruner(estimator_model, cfg)
    start = time.time()
    diagnostics = estimator.provider.ready(
        estimator_model,
        CalibrationStream(calibration(data, args.batch_size, args.calibration_limit, args.calibration_seed)),
    )
    curvature_s = time.time() - start
    state = estimator.provider.state_dict()
    # FishLeg: aux loss and residual ‖(F+γ)Qu − u‖/‖u‖ of the last warm-up step; baselines: examples used
    row = {
        "method": name,
        "calibration_seed": args.calibration_seed,
        "recipe": cfg,
        "curvature_seconds": curvature_s,
        "curvature_gib": estimator.provider.memory_bytes() / 2**30,
        "curvature_diagnostics": diagnostics,
        "results": {},
    }
    del estimator, estimator_model
    for sparsity in sparsities:
        model = copy.deepcopy(dense)
        pruner = Pruner(model, cfg)
        pruner.adopt_curvature(state)
        start = time.time()
        pruner.prune_to(
            model,
            sparsity,
            CalibrationStream(calibration(data, args.batch_size, args.calibration_limit, args.calibration_seed)),
        )
        row["results"][str(sparsity)] = {
            "prune_seconds": time.time() - start,
            "sparsity": pruner.masks.global_sparsity(),
            **minilm.scores(model, data),
            "layer_sparsity": {layer: pruner.masks.sparsity(layer) for layer in pruner.masks},
        }
        result = row["results"][str(sparsity)]
        print(
            f"{name:18s} {100 * sparsity:4.0f} %  val {100 * result['validation']:.2f}  test {100 * result['test']:.2f}"
            f"  loss {result['validation_loss']:.4f} / {result['test_loss']:.4f}",
            flush=True,
        )
    return row


def peer_rows(python: Path, dense_dir: Path, sparsities: str, quick: bool) -> list[dict]:
    """llm-compressor's rows, run from its own environment on the checkpoint this script cached."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        command = [
            str(python.absolute()),
            "-m",
            PEERS_MODULE,
            "--sparsities",
            sparsities,
            "--dense_dir",
            str(dense_dir),
            "--output",
            str(out),
        ] + (["--quick"] if quick else [])
        subprocess.run(command, check=True, cwd=REPO)
        rows = json.loads(out.read_text())["methods"]
    for row in rows:
        row["source"] = "llm-compressor, own environment (benchmarks/peers)"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="One-shot pruning of the fine-tuned MiniLM")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_batches", type=int, default=64)
    parser.add_argument(
        "--calibration_seed", type=int, default=0, help="order of the train examples the calibration batches take"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--peers",
        nargs="?",
        const=str(PEERS_PYTHON),
        default=None,
        metavar="PYTHON",
        help=f"also run llm-compressor's SparseGPT / Wanda with this interpreter (default {PEERS_PYTHON})",
    )
    args = parser.parse_args()
    if args.peers and not Path(args.peers).is_file():  # fail before an hour of fls_hf methods, not after
        parser.error(
            f"--peers: no interpreter at {args.peers}; make the peers' venv as "
            "benchmarks/peers/llmcompressor_oneshot.py says"
        )
    args.calibration_limit = None
    torch.manual_seed(0)
    data = minilm.splits()
    if args.quick:
        args.methods, args.sparsities, args.num_batches, args.calibration_limit = (
            "magnitude,fls-kfac-diag",
            "0.5",
            2,
            16,
        )
        data = {
            "train": data["train"],
            "validation": data["validation"].select(range(64)),
            "test": data["test"].select(range(64)),
        }
    if args.quick:  # a smoke model, cached apart from the real one
        dense_dir = minilm.QUICK_DENSE_DIR
        dense = minilm.dense_model({"train": data["train"].select(range(64))}, directory=dense_dir)
    else:
        dense_dir = minilm.DENSE_DIR
        dense = minilm.dense_model(data)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    report = {
        "dense": {
            **minilm.scores(dense, data),
            "checkpoint": minilm.checkpoint_id(dense_dir),
        },
        "settings": {
            "batch_size": args.batch_size,
            "num_batches": args.num_batches,
            "max_length": minilm.MAX_LENGTH,
            "calibration_seed": args.calibration_seed,
        },
        "methods": [],
    }
    print(f"dense: val {100 * report['dense']['validation']:.2f}  test {100 * report['dense']['test']:.2f}", flush=True)
    out = (
        Path(args.output)
        if args.output
        else RESULTS / ("oneshot_minilm_quick.json" if args.quick else "oneshot_minilm.json")
    )
    for name in args.methods.split(","):
        recipe = resolve(name)
        if args.quick:  # a smoke run exercises the pipeline, not the estimate
            recipe["curvature"] = quick_curvature(recipe["curvature"])
        report["methods"].append(run_method(name, recipe, dense, data, sparsities, args))
        out.write_text(json.dumps(report, indent=1) + "\n")
    if args.peers:
        report["methods"].extend(peer_rows(Path(args.peers), dense_dir, args.sparsities, args.quick))
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

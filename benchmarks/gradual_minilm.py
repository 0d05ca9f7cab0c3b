"""B1 / issue 6: gradual pruning of the fine-tuned MiniLM during further fine-tuning, every method alike.

Each method starts from the same cached dense model (`minilm.dense_model`) and trains for the same
steps, learning rate, batch size and seed with `FishLegPruningTrainer`; only `pruning.method` and its
`curvature:` section differ. Sparsity rises along the same cubic schedule, then the model recovers
for the remaining steps. `finetune` runs the same training with no pruning: the wall-time reference.
Every method runs in its own process, so peak memory (max RSS) is per method.

    python -m benchmarks.gradual_minilm                                   # all methods, 90 %
    python -m benchmarks.gradual_minilm --methods gmp,fls --sparsity 0.8 --seeds 0,1
    python -m benchmarks.gradual_minilm --methods fls --set damping=1e-4 --set aux_lr=1e-2   # a scan point
    python -m benchmarks.gradual_minilm --quick                           # smoke run: a few steps, tiny slices
    python -m benchmarks.gradual_minilm --start pretrained --methods finetune,taylor-uniform --sparsity 0.5 \
        --mask_type neurons                                               # prune while learning the task

`--mask_type neurons+heads --head_sparsity 0.5` removes heads too (rows go to `..._neurons+heads50...`).
`--window 0.2,0.8` prunes from 20 % to 80 % of the run instead (rows go to a file tagged `_window20-80`).
`--start pretrained` begins from the pre-trained MiniLM with a fresh head (drawn from the seed) instead of the
cached task fine-tune: pruning then competes with learning the task, and `finetune` is its dense reference.

`--set key=value` overrides a `curvature:` setting of every selected method, `--set fls.key=value` of one
(values parsed as YAML, see benchmarks/common/overrides.py); such rows are named e.g. `fls[damping=0.0001]`,
so scan points sit beside the defaults.

Results: benchmarks/results/gradual_minilm[_<sparsity>].json (one row per method and seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common.encoder_recipe import recipe as encoder_recipe
from .common.overrides import parse_overrides, quick_curvature, row_name
from .common.paths import REPO, RESULTS
from .common.rows import open_report, record

# Same schedule for all; per-method curvature settings from the one-shot benchmark's validation scans.
METHODS = {
    "finetune": None,
    "gmp": encoder_recipe("magnitude", {}, compensation="none"),
    "obd": encoder_recipe(
        "diagonal_fisher", {"num_grads": 256, "fisher_labels": "sampled", "damping": 1e-8}, compensation="none"
    ),
    "obert": encoder_recipe("block_fisher", {"num_grads": 256, "block_size": 50, "damping": 1e-6}, obs_block_size=50),
    "fls": encoder_recipe(
        "fishleg",
        {
            "structure": "diagonal",
            "init": "kfac",
            "init_examples": 256,
            "damping": 1e-6,
            "warmup_steps": 10,
            "refinement_steps": 5,
            "aux_lr": 1e-3,
            "rewarm": False,
        },
        compensation="none",
    ),
    # issue 17: K-FAC statistics re-taken on the current weights at every pruning step, row-wise OBC (one round per
    # step: the schedule's 7 steps already prune in stages; on 2 CPU cores each round costs minutes)
    "fls-obc": encoder_recipe(
        "kfac", {"num_examples": 256, "damping": 1e-6, "damping_mode": "absolute"}, compensation="obc"
    ),
    # the same with the kfac default damping: γ = 1e-2 × the mean K-FAC Fisher diagonal, re-taken at every step
    "fls-obc-rel": encoder_recipe("kfac", {"num_examples": 256, "damping": 1e-2}, compensation="obc"),
    # the same with the sweep solver (SparseGPT's column sweep, adaptive masks, one factor per layer): issue 18's cost
    "fls-obc-sweep-rel": encoder_recipe(
        "kfac", {"num_examples": 256, "damping": 1e-2}, compensation="obc", obc_solver="sweep"
    ),
    # issue 18: the exact solver's joint update, ranked without per-row solves (the sweep's ranking)
    "fls-obc-joint-rel": encoder_recipe(
        "kfac", {"num_examples": 256, "damping": 1e-2}, compensation="obc", obc_solver="joint"
    ),
    # issue 18: K-FAC statistics from the training steps before each pruning step (no pass after the first)
    "fls-obc-joint-train-rel": encoder_recipe(
        "kfac", {"num_examples": 256, "damping": 1e-2, "statistics": "training"}, compensation="obc", obc_solver="joint"
    ),
    # the same update by conjugate gradients where cheaper than the factorisations (a loss within 1e-3 of it)
    "fls-obc-cg-train-rel": encoder_recipe(
        "kfac", {"num_examples": 256, "damping": 1e-2, "statistics": "training"}, compensation="obc", obc_solver="cg"
    ),
    "fls-obc-sweep-train-rel": encoder_recipe(
        "kfac", {"num_examples": 256, "damping": 1e-2, "statistics": "training"}, compensation="obc", obc_solver="sweep"
    ),
    "fls-obc-train-rel": encoder_recipe(
        "kfac", {"num_examples": 256, "damping": 1e-2, "statistics": "training"}, compensation="obc"
    ),
    # issue 20, `--mask_type neurons`: FFN neurons by group OBS (kfac) or column norm (magnitude); `-uniform` removes
    # the same share in every block (one width: the saved model shrinks), the others allocate by one global threshold
    "fls-obc-rel-uniform": encoder_recipe("kfac", {"num_examples": 256, "damping": 1e-2}, global_sparsity=False),
    # the same with the mean data-label gradient's first-order term in each group's cost (`curvature.first_order`)
    "fls-obc-rel-uniform-fo": encoder_recipe(
        "kfac", {"num_examples": 256, "damping": 1e-2, "first_order": True}, global_sparsity=False
    ),
    "gmp-uniform": encoder_recipe("magnitude", {}, compensation="none", global_sparsity=False),
    # first-order Taylor importance (Molchanov et al. 2019) from 8 batches of 32 (the kfac rows' 256 examples)
    "taylor": encoder_recipe("taylor", {"num_batches": 8}),
    "taylor-uniform": encoder_recipe("taylor", {"num_batches": 8}, global_sparsity=False),
}
# `fls` rows are the first measured setting (refine only); `fls[rewarm=True]` (--set rewarm=true) is the package
# default since the B3 (b) / B1 runs showed it ahead (benchmarks/README.md).


DEFAULT_WINDOW = (0.0, 0.6)  # prune from step 0 to 60 % of the run, recover for the last 40 %


def schedule(steps: int, sparsity: float, mask_type: str, window: tuple[float, float] = DEFAULT_WINDOW) -> dict:
    """Prune over the `window` of the run (default from step 0 to 60 %, 7 pruning steps), recover for the rest."""
    start = int(window[0] * steps)
    end = max(int(window[1] * steps), start + 1)
    return {
        "init_sparsity": min(0.3, sparsity),
        "final_sparsity": sparsity,
        "start_step": start,
        "end_step": end,
        "update_frequency": max((end - start) // 6, 1),
        "inter_func": "cubic",
        "mask_type": mask_type,
    }


def window(text: str) -> tuple[float, float]:
    """`--window START,END`: the pruning window as fractions of the run, 0 <= START < END <= 1."""
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--window {text!r}: expected two fractions START,END, e.g. 0.2,0.8") from None
    if not 0 <= start < end <= 1:
        raise SystemExit(f"--window {text!r}: expected 0 <= START < END <= 1")
    return start, end


def cpu_seconds() -> float:
    """User + system CPU time of this process: unlike wall time, not inflated by CPU steal on a shared host."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_single(args) -> dict:
    """One method, one seed, in this process: train, evaluate, measure."""
    # imported here: the parent only spawns children, and these imports cost it seconds
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from fls_hf import FishLegPruningTrainer

    from .common import minilm

    data = minilm.splits()
    if args.quick:
        data = {
            "train": data["train"].select(range(64)),
            "validation": data["validation"].select(range(64)),
            "test": data["test"].select(range(64)),
        }
    dense_dir = minilm.QUICK_DENSE_DIR if args.quick else minilm.DENSE_DIR
    if args.start == "pretrained":  # the harder protocol: pruning competes with learning the task
        model, checkpoint = minilm.pretrained_model(args.seed), "pretrained"
    else:
        model, checkpoint = minilm.dense_model(data, directory=dense_dir), minilm.checkpoint_id(dense_dir)
    steps = -(-len(data["train"]) // args.batch_size) * args.epochs
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="gradual-"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=max(steps // 10, 1),
        disable_tqdm=True,
    )
    common = {
        "model": model,
        "args": training,
        "train_dataset": data["train"],
        "data_collator": DataCollatorWithPadding(minilm.tokenizer()),
    }
    recipe = copy.deepcopy(METHODS[args.method])
    if recipe is None:
        trainer = Trainer(**common)
    else:
        recipe["pruning"].update(schedule(steps, args.sparsity, args.mask_type, window(args.window)))
        if args.mask_type == "neurons+heads":  # the heads' share, reached along the same schedule
            recipe["pruning"]["head_sparsity"] = args.head_sparsity
        recipe["curvature"].setdefault("num_batches", 4)
        recipe["curvature"].update(parse_overrides(args.set, args.method))
        if args.quick:  # a smoke run exercises the pipeline, not the estimate
            recipe["curvature"] = quick_curvature(recipe["curvature"])
        trainer = FishLegPruningTrainer(recipe=recipe, **common)
    start, cpu_start = time.time(), cpu_seconds()
    trainer.train()
    seconds, cpu = time.time() - start, cpu_seconds() - cpu_start
    pruner = getattr(trainer, "pruner", None)
    return {
        "method": row_name(args.method, parse_overrides(args.set, args.method)),
        "seed": args.seed,
        "dense_checkpoint": checkpoint,
        "recipe": recipe,
        "steps": steps,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu,
        "sparsity": pruner.masks.global_sparsity() if pruner else 0.0,
        "layer_sparsity": {n: pruner.masks.sparsity(n) for n in pruner.masks} if pruner else {},
        "curvature_gib": pruner.provider.memory_bytes() / 2**30 if pruner else 0.0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **minilm.scores(model, data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Gradual pruning of the fine-tuned MiniLM during fine-tuning")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument(
        "--mask_type", default="unstructured", help="unstructured | N:M, e.g. 2:4 | neurons | heads | neurons+heads"
    )
    parser.add_argument(
        "--head_sparsity", type=float, default=None, help="with --mask_type neurons+heads: the heads' share"
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--start",
        choices=["finetuned", "pretrained"],
        default="finetuned",
        help="start from the cached task fine-tune (default) or from the pre-trained MiniLM with a fresh head",
    )
    parser.add_argument(
        "--window", default="0,0.6", help="pruning window START,END as fractions of the run (default 0,0.6)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--quick", action="store_true", help="64 examples, one method (fls): a smoke run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a curvature setting of every selected method (repeatable)",
    )
    parser.add_argument("--output", default=None)
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        Path(args.row).write_text(json.dumps(run_single(args)))
        return
    if args.quick:
        args.methods, args.batch_size = "fls", 16  # the loop is the same for every method: one child
    pruning_window = window(args.window)  # refused here, before any child starts, when malformed
    if (args.mask_type == "neurons+heads") != (args.head_sparsity is not None):
        parser.error("--head_sparsity goes with --mask_type neurons+heads, and that mask type needs it")
    tag = (
        "quick"
        if args.quick
        else f"{round(100 * args.sparsity)}"
        + ("" if args.mask_type == "unstructured" else "_" + args.mask_type.replace(":", "of"))
        + ("" if args.head_sparsity is None else f"{round(100 * args.head_sparsity)}")
        + ("" if args.start == "finetuned" else "_" + args.start)
        + (
            ""
            if pruning_window == DEFAULT_WINDOW
            else "_window{:.0f}-{:.0f}".format(*(100 * v for v in pruning_window))
        )
    )
    out = Path(args.output) if args.output else RESULTS / f"gradual_minilm_{tag}.json"
    settings = {
        k: getattr(args, k)
        for k in (
            "sparsity",
            "mask_type",
            "head_sparsity",
            "start",
            "window",
            "epochs",
            "batch_size",
            "learning_rate",
            "quick",
        )
    }
    report = open_report(out, settings, fresh=args.quick)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.methods.split(","):
            with tempfile.NamedTemporaryFile(suffix=".json") as row:
                command = [
                    sys.executable,
                    "-m",
                    "benchmarks.gradual_minilm",
                    "--method",
                    name,
                    "--seed",
                    str(seed),
                    "--row",
                    row.name,
                    "--sparsity",
                    str(args.sparsity),
                    "--mask_type",
                    args.mask_type,
                    *(["--head_sparsity", str(args.head_sparsity)] if args.head_sparsity is not None else []),
                    "--start",
                    args.start,
                    "--window",
                    args.window,
                    "--epochs",
                    str(args.epochs),
                    "--batch_size",
                    str(args.batch_size),
                    "--learning_rate",
                    str(args.learning_rate),
                ]
                command += [f"--set={pair}" for pair in args.set]
                subprocess.run(command + (["--quick"] if args.quick else []), check=True, cwd=REPO)
                result = json.loads(Path(row.name).read_text())
            record(report, result, out, extra=f"  peak {result['peak_rss_gib']:.2f} GiB")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

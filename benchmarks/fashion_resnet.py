"""B3 (b): gradual pruning of a small ResNet on Fashion-MNIST to 95 % (the FLS paper's ResNet18 / CIFAR-10 study).

A CPU-sized ResNet (3×3 stem, one basic block per stage at widths 16 / 32 / 64, strides 1 / 2 / 2, BatchNorm,
global average pool, linear head; 78 k weights) is trained dense once (cached in benchmarks/cache/), then
every method prunes all convolutions but the 1-channel stem (the 1×1 shortcuts included) with one global
threshold during more training under the same `FishLegPruningTrainer` schedule, learning rate and seed:
sparsity rises along a cubic curve over the first 60 % of the steps, then the network recovers. The stem
(144 weights) and the head stay dense, as is usual for ResNets. Metric: accuracy on the 10,000 test images;
every setting was chosen on a 5,000-image validation split held out of the train file.

    python -m benchmarks.fashion_resnet                                  # every method, 95 %
    python -m benchmarks.fashion_resnet --methods gmp,fls --sparsity 0.9 --seeds 0,1
    python -m benchmarks.fashion_resnet --quick --output /tmp/q.json     # smoke run (~1 min)
    python -m benchmarks.fashion_resnet --report benchmarks/results/fashion_resnet_95.json

Results: benchmarks/results/fashion_resnet_<sparsity>.json (+ .png with --report).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from fls_hf import FishLegPruningTrainer

from .common import fashion_data, model_cache
from .common.overrides import parse_overrides, quick_curvature, row_name
from .common.paths import CACHE, RESULTS
from .common.rows import record

BLOCK = 16  # oBERT-style block: divides every pruned layer's row (16·9, 32·9, 64·9, and the 16 / 32 shortcut inputs)


# ----------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a strided 1×1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """`forward(pixel_values, labels=None)` → `SequenceClassifierOutput`: what the Trainer and fls_hf read."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, channels = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(channels, width, stride=1 if i == 0 else 2))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, classes)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        features = self.stages(self.stem(pixel_values)).mean(dim=(2, 3))
        logits = self.fc(features)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


TARGETS = [r"re:stages\..*(conv\d|shortcut\.0)$"]


# ----------------------------------------------------------------------------- data
class Images(torch.utils.data.Dataset):
    """Fashion-MNIST as `{"pixel_values": (1, 28, 28), "labels": ()}` items (normalised to mean 0, sd 1)."""

    MEAN, STD = 0.286, 0.353  # Fashion-MNIST train-set pixel statistics

    def __init__(self, pixels: np.ndarray, labels: np.ndarray) -> None:
        self.pixels = ((torch.from_numpy(pixels) - self.MEAN) / self.STD).reshape(-1, 1, 28, 28)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def datasets(quick: bool) -> dict[str, Images]:
    parts = fashion_data.labelled_splits(validation=5000, seed=0, limit=512 if quick else None)
    return {name: Images(*pair) for name, pair in parts.items()}


@torch.no_grad()
def accuracy(model: nn.Module, data: Images, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(
        int((model(x).logits.argmax(-1) == y).sum())
        for x, y in zip(data.pixels.split(batch_size), data.labels.split(batch_size))
    )
    return correct / len(data)


# ----------------------------------------------------------------------------- training
def training_args(args: argparse.Namespace, epochs: float, lr: float, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fashion-resnet-"),
        num_train_epochs=epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        weight_decay=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        seed=seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=100,
        disable_tqdm=args.quick,
    )


def dense_model(data: dict[str, Images], args: argparse.Namespace) -> tuple[SmallResNet, dict]:
    """The trained dense ResNet, from the cache when its settings match (quick runs are never cached)."""
    settings = {
        "epochs": args.dense_epochs,
        "lr": args.dense_lr,
        "batch_size": args.batch_size,
        "train_images": len(data["train"]),
    }
    folder = CACHE / f"fashion-resnet-e{args.dense_epochs}"
    torch.manual_seed(0)

    def train(model: SmallResNet) -> None:
        Trainer(
            model=model, args=training_args(args, args.dense_epochs, args.dense_lr, seed=0), train_dataset=data["train"]
        ).train()

    def evaluate(model: SmallResNet) -> dict:
        return {"validation": accuracy(model, data["validation"]), "test": accuracy(model, data["test"])}

    return model_cache.trained(SmallResNet(), folder, settings, train, cache=not args.quick, evaluate=evaluate)


def recipe(method: str, curvature: dict, **pruning) -> dict:
    return {
        "pruning": {
            "method": method,
            "targets": TARGETS,
            "ignore": [],
            "global_sparsity": True,
            "max_layer_sparsity": 0.99,
            **pruning,
        },
        "curvature": curvature,
    }


METHODS = {
    "finetune": None,
    "gmp": recipe("magnitude", {}, compensation="none"),
    "obd": recipe(
        "diagonal_fisher", {"num_grads": 256, "fisher_labels": "sampled", "damping": 1e-6}, compensation="none"
    ),
    "obert": recipe("block_fisher", {"num_grads": 256, "block_size": BLOCK, "damping": 1e-6}, obs_block_size=BLOCK),
    "fls": recipe(
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
    # issue 17: K-FAC (im2col patches for the convolutions) re-taken at every pruning step, row-wise OBC
    "fls-obc": recipe("kfac", {"num_examples": 256, "damping": 1e-6, "damping_mode": "absolute"}, compensation="obc"),
    # the same with the kfac default damping: γ = 1e-2 × the mean K-FAC Fisher diagonal, re-taken at every step
    "fls-obc-rel": recipe("kfac", {"num_examples": 256, "damping": 1e-2}, compensation="obc"),
}
# `fls` rows are the first measured setting (refine only); `fls[rewarm=True]` (--set rewarm=true) is the package
# default since the B3 (b) / B1 runs showed it ahead (benchmarks/README.md).


def schedule(steps: int, sparsity: float) -> dict:
    """Prune from step 0 to 60 % of the run (10 pruning steps), recover for the last 40 %."""
    end = max(int(0.6 * steps), 1)
    return {
        "init_sparsity": min(0.3, sparsity),
        "final_sparsity": sparsity,
        "start_step": 0,
        "end_step": end,
        "update_frequency": max(end // 9, 1),
        "inter_func": "cubic",
    }


def run_method(
    name: str, dense: SmallResNet, data: dict[str, Images], args: argparse.Namespace, seed: int, pairs: list[str]
) -> dict:
    model = copy.deepcopy(dense).train()
    overrides = parse_overrides(pairs, name)
    steps = -(-len(data["train"]) // args.batch_size) * args.epochs
    common = {"model": model, "args": training_args(args, args.epochs, args.lr, seed), "train_dataset": data["train"]}
    cfg = copy.deepcopy(METHODS[name])
    if cfg is None:
        trainer = Trainer(**common)
    else:
        cfg["pruning"].update(schedule(steps, args.sparsity))
        cfg["curvature"].setdefault("num_batches", 4)
        cfg["curvature"].update(overrides)
        if args.quick:
            cfg["curvature"] = quick_curvature(cfg["curvature"])
        trainer = FishLegPruningTrainer(recipe=cfg, **common)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    pruner = getattr(trainer, "pruner", None)
    return {
        "method": row_name(name, overrides),
        "seed": seed,
        "recipe": cfg,
        "steps": steps,
        "train_seconds": seconds,
        "sparsity": pruner.masks.global_sparsity() if pruner else 0.0,
        "curvature_gib": pruner.provider.memory_bytes() / 2**30 if pruner else 0.0,
        "validation": accuracy(model, data["validation"]),
        "test": accuracy(model, data["test"]),
    }


# ----------------------------------------------------------------------------- report
def report(path: Path) -> None:
    # matplotlib: only the report needs it (the `bench` extra)
    from .common.plots import image_link, method_bars

    data = json.loads(path.read_text())
    groups: dict[str, list[dict]] = {}
    for row in data["rows"]:
        groups.setdefault(row["method"], []).append(row)
    dense = data["dense"]
    print(
        f"dense: validation {100 * dense['validation']:.2f} %, test {100 * dense['test']:.2f} % "
        f"({dense['train_seconds']:.0f} s)\n"
    )
    print(
        "| method | seeds | sparsity | validation | test | wall time | curvature memory "
        "|\n|---|---|---|---|---|---|---|"
    )
    for name, rows in groups.items():
        val, test = (np.array([r[k] for r in rows]) * 100 for k in ("validation", "test"))

        def spread(v):
            return f"{v.mean():.2f}" + (f" ± {(v.max() - v.min()) / 2:.2f}" if len(v) > 1 else "")

        print(
            f"| {name} | {len(rows)} | {100 * rows[0]['sparsity']:.1f} % | {spread(val)} | {spread(test)} | "
            f"{np.mean([r['train_seconds'] for r in rows]):.0f} s | {max(r['curvature_gib'] for r in rows) * 1024:.2f} "
            "MiB |"
        )
    title = f"Small ResNet, Fashion-MNIST: gradual pruning to {100 * data['settings']['sparsity']:.0f} %"
    method_bars(groups, title, path.with_suffix(".png"), dense=dense["test"])
    print("\n" + image_link(path.with_suffix(".png"), "resnet"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Gradual pruning of a small ResNet on Fashion-MNIST")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=float, default=3.0, help="training epochs during gradual pruning")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dense_epochs", type=float, default=4.0)
    parser.add_argument("--dense_lr", type=float, default=2e-3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a curvature setting (repeatable)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="512 images, a fraction of an epoch: a smoke run")
    parser.add_argument("--output", default=None)
    parser.add_argument("--report", type=Path, help="print the table of a results file and write its plot")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.methods, args.epochs, args.dense_epochs, args.batch_size = "gmp,fls", 1.0, 1.0, 64
    data = datasets(args.quick)
    dense, meta = dense_model(data, args)
    weights = CACHE / f"fashion-resnet-e{args.dense_epochs}" / "model.safetensors"
    checkpoint = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() and not args.quick else None
    out = Path(args.output) if args.output else RESULTS / f"fashion_resnet_{round(100 * args.sparsity)}.json"
    settings = {
        k: getattr(args, k) for k in ("sparsity", "epochs", "lr", "dense_epochs", "dense_lr", "batch_size", "quick")
    }
    result = {"settings": settings, "dense": meta, "rows": []}
    if out.is_file() and not args.quick:  # earlier rows and notes stay
        result = {**json.loads(out.read_text()), "settings": settings, "dense": meta}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.methods.split(","):
            # each row names its dense model: the cache is per machine, and a retrained one differs (±0.2 points);
            # rows of another dense model are kept beside (`record` keys on dense_checkpoint)
            row = run_method(name, dense, data, args, seed, args.set)
            row["dense"] = {k: meta[k] for k in ("validation", "test")}
            row["dense_checkpoint"] = checkpoint
            record(result, row, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

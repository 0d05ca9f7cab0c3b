"""The deep autoencoder of B3 (a) and its training: model, Bernoulli reconstruction loss, cached dense fit."""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import model_cache
from .paths import CACHE

SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


class DeepAutoencoder(nn.Module):
    """784-1000-500-250-30-250-500-1000-784; ReLU after every layer but the code and the output.

    `forward(pixels)` returns the output logits (B, 784): the tensor fls_hf's curvature passes read as
    `logits`, with `curvature.likelihood: bernoulli`. Batches are `{"pixels": x, "labels": x}`.
    """

    LINEAR_OUTPUTS = (3, 7)  # code layer and output layer: no ReLU

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(SIZES[:-1], SIZES[1:]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i not in self.LINEAR_OUTPUTS:
                x = torch.relu(x)
        return x


# ----------------------------------------------------------------------------- data and training
def batches(images: torch.Tensor, batch_size: int, seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`{"pixels", "labels"}` batches (labels = the pixels: Bernoulli targets), shuffled when `seed` is given."""
    order = (
        torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        if seed is not None
        else torch.arange(len(images))
    )
    return [{"pixels": images[idx], "labels": images[idx]} for idx in order.split(batch_size)]


def nll(logits: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Bernoulli NLL summed over pixels, mean over images."""
    return F.binary_cross_entropy_with_logits(logits, pixels, reduction="none").sum(1).mean()


@torch.no_grad()
def reconstruction_loss(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean over `images` of the per-image Bernoulli NLL (nats)."""
    model.eval()
    total = sum(float(nll(model(x), x)) * len(x) for x in images.split(batch_size))
    return total / len(images)


def train(model: nn.Module, images: torch.Tensor, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """Adam with a cosine learning-rate decay to 0 over `epochs`; fixed seed for order."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for epoch in range(epochs):
        for batch in tqdm(
            batches(images, batch_size, seed=seed + epoch), desc=f"train epoch {epoch + 1}/{epochs}", leave=False
        ):
            loss = nll(model(batch["pixels"]), batch["pixels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def dense_model(train_images: torch.Tensor, args: argparse.Namespace) -> tuple[DeepAutoencoder, dict]:
    """The trained dense autoencoder, from the cache when its settings match (quick runs are never cached)."""
    settings = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.train_batch_size,
        "seed": args.seed,
        "train_images": len(train_images),
        "validation": args.validation,
    }
    folder = CACHE / f"fashion-autoencoder-e{args.epochs}-s{args.seed}"
    torch.manual_seed(args.seed)
    return model_cache.trained(
        DeepAutoencoder(),
        folder,
        settings,
        cache=not args.quick,
        train=lambda model: train(model, train_images, args.epochs, args.lr, args.train_batch_size, args.seed),
    )


# ----------------------------------------------------------------------------- methods

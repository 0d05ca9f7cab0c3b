"""Data-parallel helpers: no-ops without an initialised process group, one code path either way."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import DistributedError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank_seed(seed: int) -> int:
    """`seed` made distinct per data-parallel rank (rank 0 keeps it): ranks draw their own calibration batches,
    sampled labels and u, and all-reduce what they estimate, so their decisions still agree."""
    return seed + 7919 * rank()


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in place (aux gradients, curvature statistics)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def check_same_on_all_ranks(digest: str, what: str) -> None:
    """Fail loudly when `digest` (e.g. a mask hash) differs between ranks."""
    if not is_distributed():
        return
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise DistributedError(
            f"{what} differ across ranks: " + ", ".join(f"rank {i}: {d[:12]}" for i, d in enumerate(digests))
        )

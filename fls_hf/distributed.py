"""Data-parallel helpers: no-ops without an initialised process group, one code path either way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def reduce_mean_(tensor: torch.Tensor, dst: int) -> None:
    """Average `tensor` over the ranks into global rank `dst` in place; the other ranks' copies are left partial."""
    if not is_distributed():
        return
    dist.reduce(tensor, dst=dst)
    if rank() == dst:
        tensor /= dist.get_world_size()


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


class ShardCounts:
    """Integer counts over the ranks of an FSDP2 mesh, which each hold a block of rows of every targeted weight
    (`fully_shard` shards dim 0): sums for the global selection, and what the lower ranks hold (ties break in
    row-major order, where rank r's rows follow rank r − 1's). One small collective per call; every rank must make
    the same calls in the same order.

    Args:
        group: the mesh's process group.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # NCCL reduces device tensors only; gloo host ones
        cuda = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def sum(self, values: list) -> list:
        """Element-wise sums of `values` over the ranks (ints exactly; floats in float64)."""
        if not values:
            return []
        exact = all(isinstance(v, int) for v in values)
        t = torch.tensor(values, dtype=torch.int64 if exact else torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed element-wise over the ranks, a new tensor on its device (the same bits on every rank)."""
        total = tensor.to(self.device).clone()
        dist.all_reduce(total, group=self.group)
        return total.to(tensor.device)

    def all_ok(self, flags: list[bool]) -> list[bool]:
        """Each flag true on every rank (one reduction): a bad value in any rank's rows is the layer's."""
        return [bad == 0 for bad in self.sum([int(not ok) for ok in flags])]

    def global_rank(self, group_rank: int) -> int:
        """The process's rank in the default group, for collectives over the whole world."""
        return dist.get_global_rank(self.group, group_rank)

    def owners(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """A rank (of the mesh) for each named item, balancing the sizes: largest first, each to the least loaded
        rank (lowest on ties). The same on every rank: it depends on the names and sizes only."""
        load = [0] * self.size
        owners: dict[str, int] = {}
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
            owner = min(range(self.size), key=lambda r: (load[r], r))
            owners[name] = owner
            load[owner] += sizes[name]
        return owners

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Copy `tensors` from mesh rank `src` to every rank in place (same shapes, dtypes and memory layouts
        everywhere: row- or column-major, as LAPACK returns eigenvectors; collectives move storage, not strides)."""
        for t in tensors:
            if not t.is_contiguous() and not t.mT.is_contiguous():
                raise ValueError(f"broadcast_ takes row- or column-major tensors; got strides {t.stride()}")
            buffer = t if t.is_contiguous() else t.mT
            dist.broadcast(buffer, src=self.global_rank(src), group=self.group)

    def before(self, value: int) -> int:
        """Σ of `value` over the ranks below this one."""
        gathered = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        dist.all_gather(gathered, torch.tensor([value], dtype=torch.int64, device=self.device), group=self.group)
        return int(sum(int(g) for g in gathered[: self.rank]))


def summed(counts: ShardCounts | None, values: list) -> list:
    """`values` summed over the shards' ranks (unsharded: as they are)."""
    return values if counts is None else counts.sum(values)


def shard_counts(layers: Mapping[str, Any]) -> ShardCounts | None:
    """The counts over the FSDP2 mesh when the targeted weights (adapters) are sharded by rows; None when they are
    whole. Refuses mixed, differently meshed or otherwise sharded weights."""
    sharded = [a for a in layers.values() if a.sharded]
    if not sharded:
        return None
    whole = sorted(n for n, a in layers.items() if not a.sharded)
    if whole:
        raise DistributedError(
            f"targeted layers are sharded (FSDP2) but `{whole[0]}` is not: `fully_shard` every block that holds a "
            "targeted layer, or none"
        )
    mesh = sharded[0].weight.device_mesh
    for adapter in sharded:
        adapter.check_shardable()
        if adapter.weight.device_mesh != mesh:
            raise DistributedError(f"targeted layers are sharded over different meshes (e.g. `{adapter.name}`)")
        adapter.row_range  # noqa: B018 — validates the shard's rows
    return ShardCounts(mesh.get_group())

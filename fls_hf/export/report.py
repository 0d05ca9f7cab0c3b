"""The per-layer sparsity report: always measured from the weights themselves, so it is exact."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..distributed import shard_counts, summed
from ..model.forward import unwrap
from ..model.structures import live_groups, pruned_blocks, pruned_layers
from ..pruning.patterns import parse_mask_type

if TYPE_CHECKING:
    from ..recipe import PruningRecipe


@dataclass
class LayerSparsity:
    name: str
    shape: list[int]
    numel: int
    zeros: int
    pattern: str
    pattern_ok: bool

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def kept(self) -> int:
        return self.numel - self.zeros


@dataclass
class GroupSparsity:
    """Removed groups (FFN neurons, attention heads) of one block, for `pruning.mask_type: neurons | heads`."""

    block: str
    kind: str
    groups: int
    removed: int


@dataclass
class SparsityReport:
    """Achieved sparsity per targeted layer and over all of them, against the recipe's target; for structure
    recipes also the groups removed per block."""

    target: float
    global_scope: bool
    layers: list[LayerSparsity] = field(default_factory=list)
    structures: list[GroupSparsity] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def global_sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict:
        return {
            "target_sparsity": self.target,
            "global_scope": self.global_scope,
            "global_sparsity": self.global_sparsity,
            "parameters_targeted": self.numel,
            "parameters_kept": self.numel - self.zeros,
            "layers": [{**asdict(layer), "sparsity": layer.sparsity, "kept": layer.kept} for layer in self.layers],
            **({"structures": [asdict(group) for group in self.structures]} if self.structures else {}),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_markdown(self) -> str:
        lines = ["| layer | shape | pattern | sparsity | kept / total |", "|---|---|---|---|---|"]
        for layer in self.layers:
            ok = "" if layer.pattern_ok else " (violated)"
            lines.append(
                f"| `{layer.name}` | {'×'.join(map(str, layer.shape))} | {layer.pattern}{ok} | "
                f"{100 * layer.sparsity:.2f} % | {layer.kept:,} / {layer.numel:,} |"
            )
        lines.append(
            f"| **all targeted** | | | **{100 * self.global_sparsity:.2f} %** (target {100 * self.target:.2f} %) | "
            f"{self.numel - self.zeros:,} / {self.numel:,} |"
        )
        if self.structures:
            lines += ["", "| block | removed / groups |", "|---|---|"]
            lines += [f"| `{g.block}` | {g.removed} / {g.groups} {g.kind} |" for g in self.structures]
            for kind in dict.fromkeys(g.kind for g in self.structures):
                of_kind = [g for g in self.structures if g.kind == kind]
                removed, groups = sum(g.removed for g in of_kind), sum(g.groups for g in of_kind)
                lines.append(f"| **all {kind}** | **{removed} / {groups}** ({100 * removed / max(groups, 1):.2f} %) |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _nm_ok(matrix: torch.Tensor, mask_type: str) -> bool:
    pattern = parse_mask_type(mask_type)
    if pattern.is_unstructured:
        return True
    n, m = pattern.n, pattern.m
    rows, cols = matrix.shape
    if cols % m:
        return False
    return bool(((matrix.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


def sparsity_report(model: nn.Module, recipe: PruningRecipe) -> SparsityReport:
    """Measure the sparsity of every layer `recipe` targets, straight from the weights.

    Example:
        >>> print(sparsity_report(model, load_recipe("recipes/gradual-unstructured-90.yaml")))
    """
    pruning = recipe.pruning
    layers = pruned_layers(unwrap(model), pruning)
    report = SparsityReport(target=pruning.final_sparsity, global_scope=pruning.global_sparsity)
    counts = []  # per layer: weights, zeros, rows breaking the pattern (FSDP2: this rank's rows, then summed)
    for adapter in layers.values():
        matrix = adapter.weight_matrix()
        counts += [matrix.numel(), int((matrix == 0).sum()), int(not _nm_ok(matrix, pruning.mask_type))]
    shards = shard_counts(layers)
    counts = summed(shards, counts)
    blocks = pruned_blocks(unwrap(model), pruning)  # neurons / heads recipes
    live = summed(shards, [int(x) for b in blocks for x in live_groups(unwrap(model), b).tolist()])  # any rank's
    for block in blocks:
        removed = sum(flag == 0 for flag in live[: block.groups])
        live = live[block.groups :]
        report.structures.append(GroupSparsity(block.prefix, block.kind, block.groups, removed))
    if blocks:  # the weights' target: each block's layers lose its kind's share (neurons+heads: two shares)
        numel = {name: counts[3 * i] for i, name in enumerate(layers)}
        sizes = [sum(numel[m] for m in b.modules) for b in blocks]
        shares = [pruning.structure_share(b.kind, pruning.final_sparsity) for b in blocks]
        report.target = sum(s * n for s, n in zip(shares, sizes)) / max(sum(sizes), 1)
    for i, (name, adapter) in enumerate(layers.items()):
        numel, zeros, broken = counts[3 * i : 3 * i + 3]
        report.layers.append(
            LayerSparsity(
                name=name,
                shape=list(adapter.weight.shape),
                numel=numel,
                zeros=zeros,
                pattern=pruning.mask_type,
                pattern_ok=broken == 0,
            )
        )
    return report

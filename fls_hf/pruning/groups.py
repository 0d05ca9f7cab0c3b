"""One structured pruning step: remove whole groups — FFN neurons or attention heads (`model/structures.py`): columns
of each block's consumer and the matching rows of its producers.

Rules (`pruning.method`):
- kfac: group OBS (`structured.py`) on the consumer's Kronecker Fisher G ⊗ (Ā + λI) (diag G where
  `curvature.max_full_g_rows` is below the consumer's rows): a greedy removal curve
  per block, one threshold in loss units across blocks (or the same count in every block), the consumer's
  surviving columns compensated jointly, and its bias, where it has one, takes the removed mean (δb = −δW μ);
- magnitude: the groups whose consumer columns have the smallest Σ w² (the magnitude-of-group baseline), no
  compensation;
- taylor: the smallest first-order importance E_batches[(Σ_{i, j∈P} g_ij w_ij)²] (`curvature/taylor.py`), no
  compensation.
Groups removed by earlier steps stay removed (their columns are masked); λ is `damping` × mean diag Ā over the
live columns. Producers' rows are masked with no compensation (their group is gone). A block's curve runs to what it
could receive (all that is wanted, within the cap), in at most `GREEDY_STEPS` steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..curvature.base import CurvatureProvider
from ..distributed import ShardCounts
from ..errors import CurvatureError
from ..model.adapters import LayerAdapter
from ..model.blocks import any_in_groups
from ..model.structures import StructureBlock
from .masks import MaskSet
from .structured import (
    GroupCurve,
    allocate,
    bias_compensation,
    damped_inverse,
    group_compensation,
    group_removal_curve,
)

GREEDY_STEPS = 128  # greedy steps per block and pruning step at most: larger removals go in joint chunks


def removed_groups(masks: MaskSet, block: StructureBlock) -> torch.Tensor:
    """bool (groups,): True where the consumer's mask holds no weight of the group's columns."""
    return ~any_in_groups(masks.keep_matrix(block.consumer), block.columns)


def prune_groups(
    provider: CurvatureProvider,
    layers: Mapping[str, LayerAdapter],
    masks: MaskSet,
    blocks: Sequence[StructureBlock],
    target: float,
    *,
    rule: str,
    global_scope: bool = True,
    damping: float = 1e-2,
    max_sparsity: float = 1.0,
    shards: ShardCounts | None = None,
) -> dict[str, dict[str, float | int]]:
    """Remove groups until a share `target` of all of them is gone (each block's share with `global_scope` False);
    at least one group stays in every block, and at most `max_sparsity` of it is removed.

    FSDP2 (`shards`): every weight, mask and diag G holds this rank's rows; a group's cost, a sum over the
    consumer's rows, is summed over the ranks, so every rank removes the same groups (Ā, broadcast by
    `provider.visit`, is the same everywhere); each rank masks the producer rows it holds.

    Returns:
        block prefix → {"groups": count, "removed": removed after the step, "removed_now": removed by it}.
    """
    dead = {b.prefix: removed_groups(masks, b) for b in blocks}
    cap = {b.prefix: min(int(max_sparsity * b.groups), b.groups - 1) for b in blocks}
    if global_scope:
        wanted = round(target * sum(b.groups for b in blocks)) - sum(int(d.sum()) for d in dead.values())
    else:
        wanted = {
            b.prefix: max(min(round(target * b.groups), cap[b.prefix]) - int(dead[b.prefix].sum()), 0) for b in blocks
        }
    reduce = None if shards is None else shards.sum_tensor
    total = reduce or (lambda t: t)
    curves: dict[str, GroupCurve] = {}
    inverses: dict[str, torch.Tensor] = {}
    means: dict[str, torch.Tensor] = {}  # blocks whose consumer's bias is free: its inputs' mean μ
    by_consumer = {b.consumer: b for b in blocks}
    for consumer in provider.visit([b.consumer for b in blocks]):
        block = by_consumer[consumer]
        alive = torch.nonzero(~dead[block.prefix]).flatten()
        room = max(cap[block.prefix] - (block.groups - len(alive)), 0)
        count = min(room, max(wanted, 0)) if global_scope else wanted[block.prefix]  # no block takes more than all
        columns = block.consumer_columns(alive)
        w = layers[consumer].weight_matrix().double()[:, columns.to(layers[consumer].weight.device)]
        if rule in ("magnitude", "taylor"):
            if rule == "magnitude":
                costs = total(w.square().reshape(w.shape[0], len(alive), block.columns).sum(dim=(0, 2)))
            else:
                costs = provider.group_importance(consumer, block.columns)[alive.to(w.device)]
            order = torch.sort(costs, stable=True).indices[:count]
            curves[block.prefix] = GroupCurve(order, costs[order].cpu())
            continue
        model = provider.row_model(consumer)
        if model is None:
            raise CurvatureError(
                f"{block.kind} by group OBS need the consumer's Kronecker statistics, which {type(provider).__name__} "
                f"does not hold for `{consumer}`: use `pruning.method: kfac` (or magnitude / taylor)"
            )
        index = columns.to(model.basis.device)
        mean = provider.input_mean(consumer) if layers[consumer].bias is not None else None
        if mean is not None:
            means[block.prefix] = mean.double().to(w.device)
            mean = mean[index]
        inverses[block.prefix] = damped_inverse(model.a_bar()[index][:, index], damping, mean)
        chunk = -(-count // GREEDY_STEPS) if count else 1
        gradient = provider.mean_gradient(consumer)
        if gradient is not None:
            gradient = gradient.double()[:, columns.to(gradient.device)]
        curves[block.prefix] = group_removal_curve(
            w, provider.output_factor(consumer), inverses[block.prefix], block.columns, count, chunk, gradient, reduce
        )
    if global_scope:
        if wanted > sum(len(c.order) for c in curves.values()):
            raise CurvatureError(
                f"cannot remove {wanted} more {blocks[0].kind}: `pruning.max_layer_sparsity` = {max_sparsity} and one "
                "group per block bound what can go"
            )
        counts = allocate(curves, max(wanted, 0))
    else:
        counts = {p: len(c.order) for p, c in curves.items()}
    report: dict[str, dict[str, float | int]] = {}
    for block in blocks:
        prefix = block.prefix
        alive = torch.nonzero(~dead[prefix]).flatten()
        chosen = curves[prefix].order[: counts[prefix]].to(alive.device)
        consumer = layers[block.consumer]
        if prefix in inverses and len(chosen):
            matrix = consumer.weight_matrix().double()
            columns = block.consumer_columns(alive).to(matrix.device)
            new = group_compensation(matrix[:, columns], inverses[prefix], chosen, block.columns)
            shift = None
            if prefix in means:
                shift = bias_compensation(new - matrix[:, columns], means[prefix][columns])
            matrix[:, columns] = new
            if not torch.isfinite(matrix).all() or (shift is not None and not torch.isfinite(shift).all()):
                raise CurvatureError(f"group OBS gave non-finite weights for `{block.consumer}`; raise the damping")
            consumer.write_matrix(matrix)
            if shift is not None:
                consumer.shift_bias(shift)
        gone = dead[prefix].clone()
        gone[alive[chosen]] = True
        gone_index = torch.nonzero(gone).flatten()
        keep = masks.keep_matrix(block.consumer).clone()
        keep[:, block.consumer_columns(gone_index).to(keep.device)] = False
        _set(masks, provider, block.consumer, keep)
        for i, producer in enumerate(block.producers):
            keep = masks.keep_matrix(producer).clone()
            start, stop = layers[producer].row_range  # FSDP2: the rows this rank holds
            rows = block.producer_rows(i, gone_index)
            keep[(rows[(rows >= start) & (rows < stop)] - start).to(keep.device)] = False
            _set(masks, provider, producer, keep)
        report[prefix] = {"groups": block.groups, "removed": int(gone.sum()), "removed_now": len(chosen)}
    masks.apply(layers)
    return report


def _set(masks: MaskSet, provider: CurvatureProvider, name: str, keep: torch.Tensor) -> None:
    masks.set(name, keep)
    if name in provider.layers:
        provider.mask(name, masks.keep_matrix(name))

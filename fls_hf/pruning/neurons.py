"""One structured pruning step: remove FFN neurons (whole columns of each block's consumer, rows of its producers).

Rules (`pruning.method`):
- kfac: group OBS (`structured.py`) on the consumer's Kronecker Fisher diag(G) ⊗ (Ā + λI): a greedy removal curve
  per block, one threshold in loss units across blocks (or the same count in every block), the consumer's
  surviving columns compensated jointly;
- magnitude: the neurons whose consumer column has the smallest ‖W_:,j‖² (the magnitude-of-group baseline), no
  compensation;
- taylor: the smallest first-order importance E_batches[(Σ_i g_ij w_ij)²] (`curvature/taylor.py`), no compensation.
Neurons removed by earlier steps stay removed (their columns are masked); λ is `damping` × mean diag Ā over the
live neurons. Producers' rows are masked with no compensation (their neuron is gone). A block's curve runs to what it
could receive (all that is wanted, within the cap), in at most `GREEDY_STEPS` steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..curvature.base import CurvatureProvider
from ..errors import CurvatureError
from ..model.adapters import LayerAdapter
from ..model.structures import FFNBlock
from .masks import MaskSet
from .structured import GroupCurve, allocate, damped_inverse, group_compensation, group_removal_curve

GREEDY_STEPS = 128  # greedy steps per block and pruning step at most: larger removals go in joint chunks


def removed_neurons(masks: MaskSet, block: FFNBlock) -> torch.Tensor:
    """bool (neurons,): True where the consumer's mask holds no weight of the column."""
    return ~masks.keep_matrix(block.consumer).any(dim=0)


def prune_neurons(
    provider: CurvatureProvider,
    layers: Mapping[str, LayerAdapter],
    masks: MaskSet,
    blocks: Sequence[FFNBlock],
    target: float,
    *,
    rule: str,
    global_scope: bool = True,
    damping: float = 1e-2,
    max_sparsity: float = 1.0,
) -> dict[str, dict[str, float | int]]:
    """Remove FFN neurons until a share `target` of all of them is gone (each block's share with `global_scope`
    False); at least one neuron stays in every block, and at most `max_sparsity` of it is removed.

    Returns:
        block prefix → {"neurons": width, "removed": removed after the step, "removed_now": removed by it}.
    """
    dead = {b.prefix: removed_neurons(masks, b) for b in blocks}
    width = {b.prefix: dead[b.prefix].numel() for b in blocks}
    cap = {p: min(int(max_sparsity * n), n - 1) for p, n in width.items()}
    if global_scope:
        wanted = round(target * sum(width.values())) - sum(int(d.sum()) for d in dead.values())
    else:
        wanted = {p: max(min(round(target * width[p]), cap[p]) - int(dead[p].sum()), 0) for p in width}
    curves: dict[str, GroupCurve] = {}
    inverses: dict[str, torch.Tensor] = {}
    by_consumer = {b.consumer: b for b in blocks}
    for consumer in provider.visit([b.consumer for b in blocks]):
        block = by_consumer[consumer]
        alive = torch.nonzero(~dead[block.prefix]).flatten()
        room = max(cap[block.prefix] - (width[block.prefix] - len(alive)), 0)
        count = min(room, max(wanted, 0)) if global_scope else wanted[block.prefix]  # no block takes more than all
        w = layers[consumer].weight_matrix().double()[:, alive]
        if rule in ("magnitude", "taylor"):
            if rule == "magnitude":
                costs = w.square().sum(0)
            else:
                costs = provider.column_importance(consumer)[alive.to(w.device)]
            order = torch.sort(costs, stable=True).indices[:count]
            curves[block.prefix] = GroupCurve(order, costs[order].cpu())
            continue
        model = provider.row_model(consumer)
        if model is None:
            raise CurvatureError(
                f"FFN neurons by group OBS need the consumer's Kronecker statistics, which {type(provider).__name__} "
                f"does not hold for `{consumer}`: use `pruning.method: kfac` (or magnitude)"
            )
        a_bar = model.a_bar()[alive][:, alive]
        inverses[block.prefix] = damped_inverse(a_bar, damping)
        chunk = -(-count // GREEDY_STEPS) if count else 1
        curves[block.prefix] = group_removal_curve(w, model.row_weight, inverses[block.prefix], 1, count, chunk)
    if global_scope:
        if wanted > sum(len(c.order) for c in curves.values()):
            raise CurvatureError(
                f"cannot remove {wanted} more FFN neurons: `pruning.max_layer_sparsity` = {max_sparsity} and one "
                "neuron per block bound what can go"
            )
        counts = allocate(curves, max(wanted, 0))
    else:
        counts = {p: len(c.order) for p, c in curves.items()}
    report: dict[str, dict[str, float | int]] = {}
    for block in blocks:
        prefix = block.prefix
        alive = torch.nonzero(~dead[prefix]).flatten()
        chosen = curves[prefix].order[: counts[prefix]]
        consumer = layers[block.consumer]
        if prefix in inverses and len(chosen):
            matrix = consumer.weight_matrix().double()
            matrix[:, alive] = group_compensation(matrix[:, alive], inverses[prefix], chosen, 1)
            if not torch.isfinite(matrix).all():
                raise CurvatureError(f"group OBS gave non-finite weights for `{block.consumer}`; raise the damping")
            consumer.write_matrix(matrix)
        gone = dead[prefix].clone()
        gone[alive[chosen.to(alive.device)]] = True
        keep = masks.keep_matrix(block.consumer) & ~gone[None, :]
        _set(masks, provider, block.consumer, keep)
        for producer in block.producers:
            _set(masks, provider, producer, masks.keep_matrix(producer) & ~gone[:, None])
        report[prefix] = {"neurons": width[prefix], "removed": int(gone.sum()), "removed_now": len(chosen)}
    masks.apply(layers)
    return report


def _set(masks: MaskSet, provider: CurvatureProvider, name: str, keep: torch.Tensor) -> None:
    masks.set(name, keep)
    if name in provider.layers:
        provider.mask(name, masks.keep_matrix(name))

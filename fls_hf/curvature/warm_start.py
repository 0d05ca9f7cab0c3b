"""FishLeg warm starts: the Q₀ each aux run refines, from cheap curvature statistics.

`curvature.init` picks one: identity (Q₀ = I/γ, ≡ magnitude), diagonal (≡ OBD), kfac (G ⊗ Ā), fisher
(≡ oBERT's blocks). Every start falls back to I/γ, with one warning, for a layer whose statistics or Q₀
are not finite: a NaN Q₀ would never recover (every aux step on that layer is skipped).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..distributed import all_reduce_mean_

if TYPE_CHECKING:
    from .fishleg import FishLegProvider


def warm_start(provider: FishLegProvider, model: nn.Module, calibration: list[Mapping[str, Any]]) -> None:
    """Set every layer's Q to the start `provider.config.init` names, from the calibration batches."""
    starts = {"diagonal": _diagonal_start, "kfac": _kfac_start, "fisher": _fisher_start}
    start = starts.get(provider.config.init)
    if start is None:  # identity: Q = I/γ
        set_identity(provider, list(provider.layers))
        return
    unusable = start(provider, model, itertools.cycle(calibration))
    _identity_where_non_finite(provider, unusable)


def set_identity(provider: FishLegProvider, names: list[str]) -> None:
    """Q = I/γ for the named layers (what the structures are built as)."""
    for name in names:
        structure = provider.structures[name]
        structure.init_diagonal(torch.full(structure.shape, 1.0 / provider.damping, device=provider.device(name)))


def _diagonal_start(provider: FishLegProvider, model: nn.Module, batches) -> list[str]:
    """Q₀ = diag 1/(E[g²] + γ) from sampled-label per-example gradients (the OBD point)."""
    from .gradients import per_example_gradients

    sums = {name: torch.zeros(a.shape, device=provider.device(name)) for name, a in provider.layers.items()}
    count = 0
    for grads in per_example_gradients(
        model, batches, provider.layers, labels="sampled", likelihood=provider.likelihood,
        generator=provider.generator, max_examples=provider.config.init_examples,
    ):
        for name, g in grads.items():
            sums[name] += g.float().pow(2).sum(0)
        count += next(iter(grads.values())).shape[0]
    means = [sums[name] / max(count, 1) for name in provider.structures]
    all_reduce_mean_(means)  # identical Q₀ on every data-parallel rank
    unusable = []
    for (name, structure), mean in zip(provider.structures.items(), means):
        if not torch.isfinite(mean).all():
            unusable.append(name)
            continue
        d = 1.0 / (mean + provider.damping)
        if provider.models_bias(name):
            d = torch.cat([d, d.median(dim=1, keepdim=True).values], dim=1)
        structure.init_diagonal(d)
    return unusable


def _fisher_start(provider: FishLegProvider, model: nn.Module, batches) -> list[str]:
    """Q₀ = the structure's row blocks of (γI + (1/m) Σ g gᵀ)⁻¹ from true-Fisher per-example gradients
    (oBERT's estimate, from the model's own label distribution): FishLeg then refines it."""
    from .block_fisher import BlockFisherConfig, BlockFisherProvider

    config = provider.config
    block = config.block_size if config.structure == "block_diagonal" else 1
    estimate = BlockFisherProvider(provider.layers, BlockFisherConfig(
        damping=provider.damping, block_size=block, num_grads=config.init_examples,
        fisher_labels=config.init_labels, seed=config.seed,
    ), provider.likelihood)
    estimate.keep = dict(provider.keep)
    estimate.prepare(model, batches)
    for name, structure in provider.structures.items():
        structure.init_blocks(estimate.inverse.pop(name))
    return []  # a block the Cholesky factor could not represent shows up as a non-finite Q₀


def _kfac_start(provider: FishLegProvider, model: nn.Module, batches) -> list[str]:
    """Q₀ from the K-FAC Fisher G ⊗ Ā of sampled-label passes (see `kfac.py`)."""
    from .kfac import kronecker_statistics

    stats = kronecker_statistics(model, batches, provider.layers, provider.likelihood,
                                 generator=provider.generator, max_examples=provider.config.init_examples)
    unusable = []
    for name, structure in provider.structures.items():
        a_bar, g = stats[name]
        if not provider.models_bias(name):
            a_bar = a_bar[:-1, :-1]
        if not (torch.isfinite(a_bar).all() and torch.isfinite(g).all()):
            unusable.append(name)  # eigh of a NaN factor may not even return
            continue
        structure.init_kfac(a_bar, g, provider.damping)
    return unusable


def _identity_where_non_finite(provider: FishLegProvider, unusable: list[str]) -> None:
    """Q₀ = I/γ (the identity start) for layers whose warm-start statistics or Q₀ are not finite; warned."""
    broken = {n for n, s in provider.structures.items() if not all(torch.isfinite(p).all() for p in s.parameters())}
    names = sorted(set(unusable) | broken)
    set_identity(provider, names)
    if names:
        warnings.warn(
            f"FishLeg warm start (`curvature.init: {provider.config.init}`) gave non-finite statistics for "
            f"{', '.join(names)}; these layers start from Q = I/γ (as `init: identity`)", RuntimeWarning, stacklevel=4,
        )

"""FishLeg warm starts: the Q₀ each aux run refines, from cheap curvature statistics.

`curvature.init` picks one: identity (Q₀ = I/γ, ≡ magnitude), diagonal (≡ OBD), kfac (G ⊗ Ā), fisher
(≡ oBERT's blocks). Statistics come from `fls_hf.fisher`; each start hands them to the Q structures'
`init_*` methods (the parameterisation of Q₀ is the structure's business). Every start falls back to
I/γ, with one warning, for a layer whose statistics or Q₀ are not finite: a NaN Q₀ would never recover
(every aux step on that layer is skipped).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...distributed import rank_seed
from ...fisher.gradients import counted_gradients
from ...fisher.kronecker import kronecker_statistics
from ...fisher.likelihoods import Likelihood
from ...fisher.statistics import block_fisher_inverse_, fisher_diagonal, identity_blocks
from ...model.adapters import LayerAdapter
from ...model.forward import model_device
from ..base import device_generator
from .config import FishLegConfig


@dataclass
class WarmStartInputs:
    """What a warm start reads: the layers, their Q structures, the settings and the random source.

    Args:
        layers: module name → adapter.
        structures: module name → Q structure (`structures.py`), set in place.
        config: the FishLeg settings (`init`, `init_examples`, `init_labels`, `structure`, `block_size`, damping).
        likelihood: output distribution of the true Fisher.
        generator: RNG of the sampled labels.
        keep: module name → bool (rows, cols) keep mask (pruned coordinates get no gradient).
        bias_column: layers whose Q models the bias as one more input column.
    """

    layers: Mapping[str, LayerAdapter]
    structures: Mapping[str, nn.Module]
    config: FishLegConfig
    likelihood: Likelihood
    generator: torch.Generator
    keep: Mapping[str, torch.Tensor]
    bias_column: frozenset[str]


def warm_start(inputs: WarmStartInputs, model: nn.Module, calibration: list[Mapping[str, Any]]) -> None:
    """Set every layer's Q to the start `inputs.config.init` names, from the calibration batches."""
    starts = {"diagonal": _diagonal_start, "kfac": _kfac_start, "fisher": _fisher_start}
    start = starts.get(inputs.config.init)
    if start is None:  # identity: Q = I/γ
        set_identity(inputs, list(inputs.structures))
        return
    unusable = start(inputs, model, itertools.cycle(calibration))
    _identity_where_non_finite(inputs, unusable)


def set_identity(inputs: WarmStartInputs, names: list[str]) -> None:
    """Q = I/γ for the named layers (what the structures are built as)."""
    for name in names:
        structure = inputs.structures[name]
        device = inputs.layers[name].weight.device
        structure.init_diagonal(torch.full(structure.shape, 1.0 / inputs.config.damping, device=device))


def diagonal_q0(fisher_diagonal: torch.Tensor, damping: float, bias_column: bool) -> torch.Tensor:
    """Q₀ = 1/(F_qq + γ), (rows, cols); a bias column gets the row's median (no gradient of the bias is kept)."""
    d = 1.0 / (fisher_diagonal + damping)
    return torch.cat([d, d.median(dim=1, keepdim=True).values], dim=1) if bias_column else d


def _diagonal_start(inputs: WarmStartInputs, model: nn.Module, batches) -> list[str]:
    """Q₀ = diag 1/(E[g²] + γ) from sampled-label per-example gradients (the OBD point)."""
    gradients = counted_gradients(
        model,
        batches,
        inputs.layers,
        labels="sampled",
        likelihood=inputs.likelihood,
        generator=inputs.generator,
        max_examples=inputs.config.init_examples,
        desc="FishLeg diagonal start",
    )
    shapes = {name: adapter.shape for name, adapter in inputs.layers.items()}
    means, _ = fisher_diagonal(gradients, shapes, model_device(model))  # identical Q₀ on every data-parallel rank
    unusable = []
    for name, structure in inputs.structures.items():
        if not torch.isfinite(means[name]).all():
            unusable.append(name)
            continue
        structure.init_diagonal(diagonal_q0(means[name], inputs.config.damping, name in inputs.bias_column))
    return unusable


def _fisher_start(inputs: WarmStartInputs, model: nn.Module, batches) -> list[str]:
    """Q₀ = the structure's row blocks of (γI + (1/m) Σ g gᵀ)⁻¹ from true-Fisher per-example gradients
    (oBERT's estimate, from the model's own label distribution): FishLeg then refines it."""
    config = inputs.config
    block = config.block_size if config.structure == "block_diagonal" else 1
    inverse = {n: identity_blocks(*a.shape, block, config.damping, a.weight.device) for n, a in inputs.layers.items()}
    gradients = counted_gradients(
        model,
        batches,
        inputs.layers,
        labels=config.init_labels,
        likelihood=inputs.likelihood,
        # a generator of its own, seeded afresh: every fisher start draws the same labels (as it always has)
        generator=device_generator(next(iter(inputs.layers.values())).weight.device, rank_seed(config.seed)),
        max_examples=config.init_examples,
        keep=inputs.keep,
        desc="Block Fisher",
    )
    block_fisher_inverse_(inverse, gradients, block, config.damping)
    for name, structure in inputs.structures.items():
        structure.init_blocks(inverse.pop(name))
    return []  # a block the Cholesky factor could not represent shows up as a non-finite Q₀


def _kfac_start(inputs: WarmStartInputs, model: nn.Module, batches) -> list[str]:
    """Q₀ from the K-FAC Fisher G ⊗ Ā of sampled-label passes (`fisher.kronecker`)."""
    stats = kronecker_statistics(
        model,
        batches,
        inputs.layers,
        inputs.likelihood,
        generator=inputs.generator,
        max_examples=inputs.config.init_examples,
    )
    unusable = []
    for name, structure in inputs.structures.items():
        a_bar, g = stats[name]
        if name not in inputs.bias_column:
            a_bar = a_bar[:-1, :-1]
        if not (torch.isfinite(a_bar).all() and torch.isfinite(g).all()):
            unusable.append(name)  # eigh of a NaN factor may not even return
            continue
        structure.init_kfac(a_bar, g, inputs.config.damping)
    return unusable


def _identity_where_non_finite(inputs: WarmStartInputs, unusable: list[str]) -> None:
    """Q₀ = I/γ (the identity start) for layers whose warm-start statistics or Q₀ are not finite; warned."""
    broken = {n for n, s in inputs.structures.items() if not all(torch.isfinite(p).all() for p in s.parameters())}
    names = sorted(set(unusable) | broken)
    set_identity(inputs, names)
    if names:
        warnings.warn(
            f"FishLeg warm start (`curvature.init: {inputs.config.init}`) gave non-finite statistics for "
            f"{', '.join(names)}; these layers start from Q = I/γ (as `init: identity`)",
            RuntimeWarning,
            stacklevel=4,
        )

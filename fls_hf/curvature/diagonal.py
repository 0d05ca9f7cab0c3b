"""Diagonal Fisher inverse (Optimal Brain Damage): Q = diag 1/(F_qq + γ), F_qq = (1/m) Σ_n g_{n,q}².

With this Q the OBS saliency ρ_q = w_q² / (2 Q_qq) = w_q² (F_qq + γ) / 2 is OBD's, and the
compensation δW = −Q(1_P ⊙ W / diag Q) = −1_P ⊙ W only zeroes the pruned weights (no update of the
others). The estimate is not refined: `prepare` re-estimates it from `num_grads` fresh per-example
gradients at every pruning step. Pruned coordinates have zero (masked) gradients, so F_qq = 0 there
and Q_qq = 1/γ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_mean_
from .adapters import LayerAdapter
from .forward import model_device
from .gradients import GradientFisherConfig, GradientFisherProvider
from .likelihoods import Likelihood


@dataclass
class DiagonalFisherConfig(GradientFisherConfig):
    """The `curvature:` section for `method: diagonal_fisher` (`num_grads`, `fisher_labels`, `seed`)."""


class DiagonalFisherProvider(GradientFisherProvider):
    """Q = diag 1/(F_qq + γ) per layer; before the first `prepare` F = 0 (Q = I/γ, magnitude).

    Example:
        >>> provider = DiagonalFisherProvider(resolve_targets(model, targets), DiagonalFisherConfig(num_grads=256))
        >>> provider.prepare(model, calibration_batches)
        >>> provider.diag("bert.encoder.layer.0.attention.self.query")     # (rows, cols)
    """

    config_class = DiagonalFisherConfig

    def __init__(self, layers: Mapping[str, LayerAdapter], config: DiagonalFisherConfig, likelihood: Likelihood | None = None) -> None:
        super().__init__(layers, config, likelihood)
        self.fisher = {name: torch.zeros(a.shape, device=a.weight.device) for name, a in self.layers.items()}

    def prepare(self, model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """F_qq ← (1/m) Σ_n g_{n,q}² over `num_grads` examples (averaged over ranks); returns {"examples": m}."""
        sums = {name: torch.zeros_like(f) for name, f in self.fisher.items()}
        count = 0
        for size, grads in self.gradients(model, batches, desc="Diagonal Fisher"):
            for name, g in grads.items():
                sums[name] += g.pow(2).sum(0)
            count += size
        total = torch.tensor([float(count)], device=model_device(model))
        all_reduce_mean_([*sums.values(), total])
        for name, s in sums.items():
            self.fisher[name].copy_(s / total)
        self.examples = count
        return {"examples": float(count)}

    def _masked_fisher(self, name: str) -> torch.Tensor:
        keep = self.keep.get(name)
        return self.fisher[name] if keep is None else self.fisher[name] * keep.to(self.fisher[name].device)

    def diag(self, name: str) -> torch.Tensor:
        """1/(F ⊙ keep + γ), shape (rows, cols)."""
        return 1.0 / (self._masked_fisher(name) + self.damping)

    def matvec(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        """diag ⊙ V for V: (rows, cols)."""
        return self.diag(name).to(vector.device) * vector

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.fisher)

"""Diagonal Fisher inverse (Optimal Brain Damage): Q = diag 1/(F_qq + γ), F_qq = (1/m) Σ_n g_{n,q}².

With this Q the OBS saliency ρ_q = w_q² / (2 Q_qq) = w_q² (F_qq + γ) / 2 is OBD's, and the
compensation δW = −Q(1_P ⊙ W / diag Q) = −1_P ⊙ W only zeroes the pruned weights (no update of the
others). The estimate is not refined: `ready` re-estimates it from `num_grads` fresh per-example
gradients at every pruning step. Pruned coordinates have zero (masked) gradients, so F_qq = 0 there
and Q_qq = 1/γ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..fisher.likelihoods import Likelihood
from ..fisher.statistics import fisher_diagonal
from ..model.adapters import LayerAdapter
from ..model.forward import model_device
from .base import Batches
from .config import DiagonalFisherConfig
from .gradient_fisher import GradientFisherProvider


class DiagonalFisherProvider(GradientFisherProvider):
    """Q = diag 1/(F_qq + γ) per layer; before the first `ready` F = 0 (Q = I/γ, magnitude).

    Example:
        >>> provider = DiagonalFisherProvider(resolve_targets(model, targets), DiagonalFisherConfig(num_grads=256))
        >>> provider.ready(model, calibration_batches)
        >>> provider.diag("bert.encoder.layer.0.attention.self.query")     # (rows, cols)
    """

    config_class = DiagonalFisherConfig
    coupled_block = 1

    def __init__(
        self, layers: Mapping[str, LayerAdapter], config: DiagonalFisherConfig, likelihood: Likelihood | None = None
    ) -> None:
        super().__init__(layers, config, likelihood)
        self.fisher = {name: torch.zeros(a.shape, device=a.weight.device) for name, a in self.layers.items()}

    def estimate(self, model: nn.Module, batches: Batches) -> int:
        """F_qq ← (1/m) Σ_n g_{n,q}² over `num_grads` examples (averaged over ranks)."""
        shapes = {name: f.shape for name, f in self.fisher.items()}
        means, count = fisher_diagonal(self.gradients(model, batches, "Diagonal Fisher"), shapes, model_device(model))
        for name, mean in means.items():
            self.fisher[name].copy_(mean)
        return count

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

"""Q = I/γ: saliency w²·γ/2 ranks weights by magnitude; compensation is a no-op (GMP when gradual)."""

from __future__ import annotations

import torch

from .base import CurvatureProvider


class MagnitudeProvider(CurvatureProvider):
    """Identity curvature: magnitude pruning expressed through the common interface."""

    coupled_block = 1

    def diag(self, name: str) -> torch.Tensor:
        rows, cols = self.layers[name].shape
        return torch.full((rows, cols), 1.0 / self.damping, device=self.device(name))

    def matvec(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        return vector / self.damping

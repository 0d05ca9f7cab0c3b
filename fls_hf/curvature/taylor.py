"""First-order Taylor importance of structures (Molchanov et al., 2019): the baseline for `mask_type: neurons`.

Removing a group P (an FFN neuron, a head) zeroes its columns of the block's consumer; to first order the loss of a
batch changes by s_P = Σ_{i, j∈P} g_ij w_ij (g the batch's gradient of the data-label loss). The importance is
E_batches[s_P²] over `curvature.num_batches` calibration batches; the groups with the smallest go first, with no
compensation. It holds no inverse Fisher: as a Q it is magnitude's I/γ, and the recipe allows it only for
structures.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import all_reduce_mean_
from ..errors import CurvatureError
from ..fisher.gradients import data_gradients
from ..model.forward import unwrap
from .base import Batches
from .magnitude import MagnitudeProvider


class TaylorProvider(MagnitudeProvider):
    """Per layer and batch, the column sums Σ_i g_ij w_ij; `group_importance` squares them over groups of columns."""

    def __init__(self, layers, config, likelihood=None) -> None:
        super().__init__(layers, config, likelihood)
        # per layer, one row of column sums per batch (`num_batches` rows; `seen` of them filled): the state
        self.column_sums = {
            n: torch.zeros(config.num_batches, a.shape[1], dtype=torch.float64, device=a.weight.device)
            for n, a in self.layers.items()
        }
        self.seen = 0

    def ready(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        likelihood = self.likelihood_of(unwrap(model))
        seen = 0
        for _, grads in data_gradients(model, batches, self.layers, likelihood, max_batches=self.config.num_batches):
            for name, grad in grads.items():
                self.column_sums[name][seen] = (grad * self.layers[name].weight_matrix()).sum(0)
            seen += 1
        if seen == 0:
            raise CurvatureError("empty calibration dataloader: Taylor importance needs at least one batch")
        self.seen = seen
        return {}

    def group_importance(self, name: str, columns: int) -> torch.Tensor:
        """E_batches[(Σ_{i, j∈P} g_ij w_ij)²] for every group P of `columns` consecutive input columns of layer
        `name`: (cols / columns,) float64, averaged over the data-parallel ranks' batches."""
        if self.seen == 0:
            raise CurvatureError(f"Taylor importance of `{name}` is asked before any calibration pass (`ready`)")
        sums = self.column_sums[name][: self.seen]
        importance = sums.reshape(self.seen, -1, columns).sum(-1).square().mean(0)
        all_reduce_mean_([importance])
        return importance

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}/column_sums": t for n, t in self.column_sums.items()}

    def state_meta(self) -> dict:
        return {"seen": self.seen}

    def load_state_meta(self, meta) -> None:
        self.seen = int(meta.get("seen", 0))

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
from ..fisher.gradients import example_losses, fisher_targets, is_causal_lm
from ..model.forward import curvature_mode, logits_of, model_device, model_inputs, unwrap
from .base import Batches
from .magnitude import MagnitudeProvider


class TaylorProvider(MagnitudeProvider):
    """Per layer and batch, the column sums Σ_i g_ij w_ij; `group_importance` squares them over groups of columns."""

    def __init__(self, layers, config, likelihood=None) -> None:
        super().__init__(layers, config, likelihood)
        self.column_sums: dict[str, torch.Tensor] = {}

    def ready(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        model = unwrap(model)
        device, likelihood, shift = model_device(model), self.likelihood_of(model), is_causal_lm(model)
        names = list(self.layers)
        sums: list[list[torch.Tensor]] = [[] for _ in names]  # per layer, one (cols,) per batch
        seen = 0
        with curvature_mode(model, double_backward=False), torch.enable_grad():
            for batch in batches:
                if seen >= self.config.num_batches:
                    break
                logits = logits_of(model(**model_inputs(batch, device))).float()
                targets = fisher_targets(batch, logits, "empirical", likelihood, None)
                loss = example_losses(batch, logits, targets, likelihood, shift).mean()
                weights = [self.layers[n].values for n in names]
                grads = torch.autograd.grad(loss, weights, allow_unused=True)  # .grad of the training is untouched
                for per_batch, name, grad in zip(sums, names, grads):
                    adapter = self.layers[name]
                    product = 0.0 if grad is None else adapter.to_matrix(grad) * adapter.weight_matrix()
                    per_batch.append(torch.zeros(adapter.shape[1], dtype=torch.float64, device=device) + product.sum(0))
                seen += 1
        if seen == 0:
            raise CurvatureError("empty calibration dataloader: Taylor importance needs at least one batch")
        self.column_sums = {n: torch.stack(s) for n, s in zip(names, sums)}  # (batches, cols)
        return {}

    def group_importance(self, name: str, columns: int) -> torch.Tensor:
        """E_batches[(Σ_{i, j∈P} g_ij w_ij)²] for every group P of `columns` consecutive input columns of layer
        `name`: (cols / columns,) float64, averaged over the data-parallel ranks' batches."""
        if name not in self.column_sums:
            raise CurvatureError(f"Taylor importance of `{name}` is asked before any calibration pass (`ready`)")
        sums = self.column_sums[name]
        importance = sums.reshape(len(sums), -1, columns).sum(-1).square().mean(0)
        all_reduce_mean_([importance])
        return importance

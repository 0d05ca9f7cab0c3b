"""First-order Taylor importance of structures (Molchanov et al., 2019): the baseline for `mask_type: neurons`.

Removing neuron j zeroes column j of its block's consumer; to first order the loss of a batch changes by
s_j = Σ_i g_ij w_ij (g the batch's gradient of the data-label loss). The importance is E_batches[s_j²] over
`curvature.num_batches` calibration batches; the neurons with the smallest go first, with no compensation. It holds
no inverse Fisher: as a Q it is magnitude's I/γ, and the recipe allows it only for structures.
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
    """Per layer, E_batches[(Σ_i g_ij w_ij)²] for every input column j (`column_importance`)."""

    def __init__(self, layers, config, likelihood=None) -> None:
        super().__init__(layers, config, likelihood)
        self.importance: dict[str, torch.Tensor] = {}

    def ready(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        model = unwrap(model)
        device, likelihood, shift = model_device(model), self.likelihood_of(model), is_causal_lm(model)
        names = list(self.layers)
        sums = [torch.zeros(self.layers[n].shape[1], dtype=torch.float64, device=device) for n in names]
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
                for total, name, grad in zip(sums, names, grads):
                    if grad is not None:
                        adapter = self.layers[name]
                        total += (adapter.to_matrix(grad) * adapter.weight_matrix()).double().sum(0).square()
                seen += 1
        if seen == 0:
            raise CurvatureError("empty calibration dataloader: Taylor importance needs at least one batch")
        all_reduce_mean_(sums)
        self.importance = {n: s / seen for n, s in zip(names, sums)}
        return {}

    def column_importance(self, name: str) -> torch.Tensor:
        """E[(Σ_i g_ij w_ij)²] per input column of layer `name`, (cols,) float64."""
        if name not in self.importance:
            raise CurvatureError(f"Taylor importance of `{name}` is asked before any calibration pass (`ready`)")
        return self.importance[name]

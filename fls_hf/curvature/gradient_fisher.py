"""Base of the Fisher estimates rebuilt from per-example gradients at every pruning step (diagonal, block)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..fisher.gradients import counted_gradients
from ..fisher.likelihoods import Likelihood
from ..model.adapters import LayerAdapter
from .base import Batches, CurvatureProvider
from .config import GradientFisherConfig


class GradientFisherProvider(CurvatureProvider):
    """Re-estimated from `curvature.num_grads` per-example gradients, masked by the current keep masks, at every
    `ready` (no refinement: these are the estimate-then-invert baselines)."""

    config_class = GradientFisherConfig

    def __init__(
        self, layers: Mapping[str, LayerAdapter], config: GradientFisherConfig, likelihood: Likelihood | None = None
    ) -> None:
        super().__init__(layers, config, likelihood)
        self.config: GradientFisherConfig = config
        self.examples = 0

    def ready(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """Re-estimate Q from fresh gradients of the model as it is now; returns {"examples": m}."""
        self.examples = self.estimate(model, batches)
        return {"examples": float(self.examples)}

    def estimate(self, model: nn.Module, batches: Batches) -> int:
        """Fill the provider's state from `gradients`; returns the number of examples used."""
        raise NotImplementedError

    def gradients(self, model: nn.Module, batches: Batches, desc: str) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(b, {name: (b, rows, cols)}) until `num_grads` examples, masked by `self.keep`, with a progress bar."""
        return counted_gradients(
            model,
            batches,
            self.layers,
            labels=self.config.fisher_labels,
            likelihood=self.likelihood_of(model),
            generator=self.generator,
            max_examples=self.config.num_grads,
            keep=self.keep,
            desc=desc,
        )

    def state_meta(self) -> dict[str, Any]:
        return {"examples": self.examples}

    def load_state_meta(self, meta: Mapping[str, Any]) -> None:
        self.examples = int(meta.get("examples", 0))

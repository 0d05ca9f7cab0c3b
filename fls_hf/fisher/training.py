"""K-FAC statistics collected from the training steps themselves (`curvature.statistics: training`).

A gradual schedule re-takes K-FAC statistics before every pruning step; a separate pass costs a forward and a
backward over `num_examples` examples each time (~0.2× a MiniLM fine-tune on CPU over the shipped schedule). The
training steps just before a pruning step already run both on the model as it is: hooks on the targeted layers add
ā āᵀ from their forward and δ δᵀ from the training loss's backward (`KroneckerSums`), so the statistics cost only
the outer products. Differences from the pass, which the benchmarks weigh: G is the empirical Fisher of the
training loss (the data's labels, as oBERT's), the activations are those of training mode (dropout on), and the
window spans the last few optimizer steps (weights a few updates old).

Bookkeeping per optimizer step: the step's sums are added to the window at the step's end, G scaled by
(examples in the step / loss scale)² — the training loss is a mean over the step's examples, and fp16's GradScaler
multiplies every gradient by its scale — or dropped when the update was skipped (non-finite gradients). Only
forwards in training mode with gradients enabled count (evaluation inside the window does not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Mapping
from typing import Any

import torch
from torch import nn

from ..model.adapters import LayerAdapter
from ..model.forward import model_device, unwrap, with_decoder_inputs
from .hooks import layer_hooks
from .kronecker import KroneckerSums, check_supported


class TrainingStatistics:
    """Kronecker sums over the training steps of a collection window, attached and detached by the Trainer callback.

    Example:
        >>> stats = TrainingStatistics(layers, full_g=())
        >>> stats.attach(model)                  # before the window's first training step
        >>> ...                                  # training forward / backward
        >>> stats.end_step(skipped=False, loss_scale=None)   # after each optimizer step of the window
        >>> provider.ready_from_training(stats); stats.reset()   # at the pruning step
    """

    def __init__(self, layers: Mapping[str, LayerAdapter], full_g: Container[str] = ()):
        check_supported(layers)
        self.layers = layers
        self.full_g = full_g
        self.window: KroneckerSums | None = None
        self.step: KroneckerSums | None = None
        self.steps = 0  # optimizer steps added to the window
        self._hooks: contextlib.ExitStack | None = None
        self._batch: Mapping[str, Any] | None = None

    @property
    def attached(self) -> bool:
        return self._hooks is not None

    def attach(self, model: nn.Module) -> None:
        """Hook the targeted layers (and the model, for each batch's attention mask); idempotent."""
        if self._hooks is not None:
            return
        model = unwrap(model)
        if self.window is None:
            device = model_device(model)
            self.window = KroneckerSums(self.layers, device, self.full_g)
            self.step = KroneckerSums(self.layers, device, self.full_g)
        stack = contextlib.ExitStack()
        stack.callback(model.register_forward_pre_hook(self._on_model_input, with_kwargs=True).remove)
        stack.callback(model.register_forward_hook(self._on_model_output).remove)
        stack.enter_context(layer_hooks(self.layers, self._on_layer))
        self._hooks = stack

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks, self._batch = None, None

    def _on_model_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        counted = module.training and torch.is_grad_enabled()
        # an encoder-decoder's training batch marked as one (decoder inputs from its labels), for the rows' masks
        self._batch = (with_decoder_inputs(module, kwargs) if "labels" in kwargs else kwargs) if counted else None
        if counted:
            self.step.examples += _batch_size(args, kwargs)

    def _on_model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._batch = None  # layer calls outside the model's forward (none expected) are not counted

    def _on_layer(self, name: str, module: nn.Module, a: torch.Tensor, output: torch.Tensor) -> None:
        if self._batch is not None:
            self.step.observe(self._batch, name, module, a, output)

    def end_step(self, *, skipped: bool, loss_scale: float | None) -> None:
        """Close one optimizer step of the window: add its sums (or drop them, when its update was skipped)."""
        if self.step is None:
            return
        if not skipped and self.step.examples:
            scale = self.step.examples / (loss_scale or 1.0)
            self.window.add_(self.step, g_scale=scale * scale)
            self.steps += 1
        self.step.zero_()

    def averages(self, owners: Mapping[str, int] | None = None) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        """Ā and G of the window (`KroneckerSums.averages`; the window is spent: `reset` next)."""
        return self.window.averages(owners)

    def reset(self) -> None:
        """Empty the window (after a pruning step used it, or when it cannot be used)."""
        for sums in (self.window, self.step):
            if sums is not None:
                sums.zero_()
        self.steps = 0


def _batch_size(args: tuple, kwargs: Mapping[str, Any]) -> int:
    """Examples in a model call: the leading dim of its first tensor input."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0

"""Forward hooks scoped to one curvature pass: installed on entry, every handle removed in `finally`.

Statistics passes need each targeted layer's input a and, through a tensor hook on its output, the output
gradient δ. The hooks live only inside the `with` block, so the user's model is untouched between passes
(and never gains attributes: state stays in the caller's dicts keyed by layer name).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from ..model.adapters import LayerAdapter

OnForward = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]


def _leaf_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: an input that needs no grad (every parameter frozen, the first targeted layer) becomes a
    detached leaf that does, so δ reaches every targeted output (the caller's tensor is not touched)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and not args[0].requires_grad:
        return (args[0].detach().requires_grad_(True), *args[1:])
    return None


@contextlib.contextmanager
def layer_hooks(
    layers: Mapping[str, LayerAdapter], on_forward: OnForward, *, leaf_inputs: bool = False
) -> Iterator[None]:
    """Call `on_forward(name, module, input, output)` at every forward of each layer while the block runs.

    `input` is the layer's first positional input; register a tensor hook on `output` to receive δ. With
    `leaf_inputs`, inputs that need no grad are made leaves that do (for passes with the parameters frozen).
    """
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            on_forward(name, module, inputs[0], output)

        return hook

    try:
        for name, adapter in layers.items():
            if leaf_inputs:
                handles.append(adapter.module.register_forward_pre_hook(_leaf_input))
            handles.append(adapter.module.register_forward_hook(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()

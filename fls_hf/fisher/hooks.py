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


@contextlib.contextmanager
def layer_hooks(layers: Mapping[str, LayerAdapter], on_forward: OnForward) -> Iterator[None]:
    """Call `on_forward(name, module, input, output)` at every forward of each layer while the block runs.

    `input` is the layer's first positional input; register a tensor hook on `output` to receive δ.
    """
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            on_forward(name, module, inputs[0], output)

        return hook

    try:
        for name, adapter in layers.items():
            handles.append(adapter.module.register_forward_hook(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()

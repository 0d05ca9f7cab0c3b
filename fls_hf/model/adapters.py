"""One adapter per supported module kind: a uniform (rows × cols) matrix view of its weight.

Curvature providers and the surgeon only ever see this matrix view, so adding a module kind means
one adapter class and one line in `adapter_for`:

- `nn.Linear`: weight (out, in) is already the matrix.
- `transformers.pytorch_utils.Conv1D` (GPT-2): weight is stored (in, out); the matrix is its transpose.
- `nn.Conv2d`: weight (out, in/groups, kh, kw) is flattened to (out, in/groups · kh · kw).

A bias, when present, is never pruned; curvature structures that model it (the Kronecker one)
append it as an extra input column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModuleError

try:  # transformers is a hard dependency, but keep the maths importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


@dataclass
class LayerAdapter:
    """Matrix view of one prunable module's weight.

    Args:
        name (`str`): fully qualified module name inside the model.
        module (`nn.Module`): the module itself (never modified by fls_hf except its weight values).
    """

    name: str
    module: nn.Module

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the matrix view."""
        w = self.weight
        return w.shape[0], w[0].numel()

    def to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """Weight-shaped tensor → (rows, cols) view (a view where possible)."""
        return tensor.reshape(tensor.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """(rows, cols) → weight-shaped tensor."""
        return matrix.reshape(self.weight.shape)

    def weight_matrix(self) -> torch.Tensor:
        return self.to_matrix(self.weight.detach())


class Conv1DAdapter(LayerAdapter):
    """GPT-2's Conv1D stores its weight as (in, out): the matrix view is the transpose."""

    @property
    def shape(self) -> tuple[int, int]:
        rows_in, cols_out = self.weight.shape
        return cols_out, rows_in

    def to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t()

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t()


SUPPORTED_TYPES: tuple[str, ...] = ("torch.nn.Linear", "torch.nn.Conv2d", "transformers.pytorch_utils.Conv1D")


def adapter_for(name: str, module: nn.Module) -> LayerAdapter | None:
    """The adapter for `module`, or None when its type is not supported."""
    if Conv1D is not None and isinstance(module, Conv1D):
        return Conv1DAdapter(name, module)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return LayerAdapter(name, module)
    return None


def require_adapter(name: str, module: nn.Module) -> LayerAdapter:
    """Like `adapter_for` but raises a clear error for an unsupported module."""
    adapter = adapter_for(name, module)
    if adapter is None:
        raise UnsupportedModuleError(
            f"module `{name}` of type {type(module).__module__}.{type(module).__name__} is targeted for "
            f"pruning but is not supported; supported types: {', '.join(SUPPORTED_TYPES)}. "
            "Narrow `pruning.targets` or add it to `pruning.ignore`."
        )
    return adapter

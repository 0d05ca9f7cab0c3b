"""One adapter per supported module kind: a uniform (rows × cols) matrix view of its weight.

Curvature providers and the surgeon only ever see this matrix view, so adding a module kind means
one adapter class and one line in `adapter_for`:

- `nn.Linear`: weight (out, in) is already the matrix.
- `transformers.pytorch_utils.Conv1D` (GPT-2): weight is stored (in, out); the matrix is its transpose.
- `nn.Conv2d`: weight (out, in/groups, kh, kw) is flattened to (out, in/groups · kh · kw).

A bias, when present, is never pruned; curvature structures that model it (the Kronecker one)
append it as an extra input column.

Under FSDP2 (`fully_shard`) a weight is a DTensor sharded along dim 0: each process holds a block of rows
(`row_range`) and the adapter's matrix view, `shape` and `values` are that block's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

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
    # the weight dimension of the output features (the matrix view's rows); the input features lie along the other
    output_dim = 0

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def values(self) -> torch.Tensor:
        """The weight values this process holds: the whole weight, or its FSDP2 shard (writable in place)."""
        return local(self.weight)

    @property
    def sharded(self) -> bool:
        return isinstance(self.weight, DTensor)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the matrix view of the values this process holds."""
        v = self.values
        return v.shape[0], v[0].numel() if v.shape[0] else int(torch.Size(v.shape[1:]).numel())

    @property
    def rows(self) -> int:
        """Rows of the whole weight's matrix view (all shards)."""
        return self.weight.shape[self.output_dim]

    @property
    def row_range(self) -> tuple[int, int]:
        """[start, stop) of this process's rows in the whole matrix (torch.chunk's blocks, as `Shard(0)` cuts)."""
        if not self.sharded:
            return 0, self.rows
        self.check_shardable()
        return shard_rows(self.weight, f"module `{self.name}`")

    def check_shardable(self) -> None:
        """Raise unless the weight is whole or sharded by rows over a 1-D mesh (FSDP2's default)."""
        check_row_sharded(self.weight, f"module `{self.name}`")

    def to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """Weight-shaped tensor → (rows, cols) view (a view where possible)."""
        return tensor.reshape(tensor.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """(rows, cols) → tensor in the shape of `values`."""
        return matrix.reshape(self.values.shape)

    def weight_matrix(self) -> torch.Tensor:
        return self.to_matrix(self.values.detach())

    @torch.no_grad()
    def write_matrix(self, matrix: torch.Tensor) -> None:
        """Copy a (rows, cols) matrix into the weight in place, in the weight's dtype."""
        self.values.copy_(self.from_matrix(matrix.to(self.values.dtype)))

    @torch.no_grad()
    def shift_bias(self, shift: torch.Tensor) -> None:
        """bias += `shift`, (rows,) for the rows this process holds (an FSDP2 bias is cut as its weight's rows)."""
        bias = local(self.bias)
        bias.add_(shift.to(device=bias.device, dtype=bias.dtype))


def local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The part of `tensor` this process holds (a DTensor's local shard; any other tensor as it is)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_row_sharded(tensor: torch.Tensor, what: str) -> None:
    """Raise unless `tensor` is whole or sharded by rows over a 1-D mesh (FSDP2's default); `what` names it."""
    if isinstance(tensor, DTensor) and (tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),)):
        raise UnsupportedModuleError(
            f"{what} is sharded as {tuple(tensor.placements)} over a {tensor.device_mesh.ndim}-D mesh; fls_hf prunes "
            "weights sharded by rows (Shard(0)) over a 1-D mesh: `fully_shard` with its defaults"
        )


def shard_rows(tensor: torch.Tensor, what: str = "a tensor") -> tuple[int, int]:
    """[start, stop) of the dim-0 entries this process holds of `tensor`: all of them unless it is a DTensor sharded
    by rows (`Shard(0)`, torch.chunk's blocks over a 1-D mesh, FSDP2's default)."""
    rows = tensor.shape[0]
    if not isinstance(tensor, DTensor):
        return 0, rows
    check_row_sharded(tensor, what)
    mesh = tensor.device_mesh
    chunk = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = start + tensor.to_local().shape[0]
    if stop > rows or (stop < rows and stop - start != chunk):
        raise UnsupportedModuleError(f"{what}: its shard is not a torch.chunk block of rows")
    return start, stop


class Conv1DAdapter(LayerAdapter):
    """GPT-2's Conv1D stores its weight as (in, out): the matrix view is the transpose."""

    output_dim = 1

    @property
    def shape(self) -> tuple[int, int]:
        rows_in, cols_out = self.values.shape
        return cols_out, rows_in

    def check_shardable(self) -> None:
        if self.sharded:  # Shard(0) of an (in, out) weight cuts the matrix view's columns
            raise UnsupportedModuleError(
                f"module `{self.name}` (transformers Conv1D) is sharded along its input dimension; fls_hf prunes "
                "sharded weights by rows: leave it unsharded or add it to `pruning.ignore`"
            )

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

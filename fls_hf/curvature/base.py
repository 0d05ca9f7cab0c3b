"""The curvature-provider interface every inverse-Fisher estimate implements.

A provider holds, for each prunable layer (keyed by module name), an estimate Q ≈ (F + γI)⁻¹ of the
damped inverse Fisher restricted to that layer's weights. The surgeon only ever calls:

- `diag(name)`: diag Q in the layer's (rows, cols) matrix view;
- `matvec(name, V)`: Q·V for V of shape (rows, cols);
- `blocks(name, block_size)`: the dense within-row blocks of Q used by the joint OBS update;
- `prepare(model, batches)` / `update(model, batch)`: estimate before the first pruning step, refine later;
- `mask(name, keep)`: restrict Q to the surviving weights;
- `state_dict()` / `load_state_dict()`, `memory_bytes()`.

The magnitude provider (Q = I/γ) is the simplest implementation and doubles as the test double.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CurvatureError, RecipeError
from .adapters import LayerAdapter


@dataclass
class CurvatureConfig:
    """Settings shared by every curvature method (the recipe's `curvature:` section)."""

    damping: float = field(default=1e-3, metadata={"help": "γ in Q ≈ (F + γI)⁻¹; moves OBS (small) towards magnitude (large)."})
    num_batches: int = field(default=16, metadata={"help": "Calibration batches used to estimate curvature before pruning."})
    likelihood: str = field(default="auto", metadata={"help": "auto | categorical | gaussian | bernoulli (output distribution for the true Fisher)."})
    max_memory_gib: float | None = field(default=None, metadata={"help": "Refuse to allocate curvature state above this many GiB."})

    def __post_init__(self) -> None:
        if not self.damping > 0:
            raise CurvatureError(f"recipe key `curvature.damping` = {self.damping!r} must be > 0")
        if self.num_batches < 1:
            raise CurvatureError(f"recipe key `curvature.num_batches` = {self.num_batches!r} must be >= 1")
        allowed = ("auto", "categorical", "gaussian", "bernoulli")
        if self.likelihood not in allowed:
            raise CurvatureError(f"recipe key `curvature.likelihood` = {self.likelihood!r}; allowed: {', '.join(allowed)}")


def row_blocks(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """(rows, cols) → (rows · ceil(cols / B), B): consecutive weights of a row, zero-padded at the row end."""
    rows, cols = matrix.shape
    pad = (-cols) % block_size
    if pad:
        matrix = torch.nn.functional.pad(matrix, (0, pad))
    return matrix.reshape(rows * ((cols + pad) // block_size), block_size)


def from_row_blocks(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `row_blocks`: (nblocks, B) → (rows, cols), dropping the padding."""
    rows, cols = shape
    return blocks.reshape(rows, -1)[:, :cols]


def regroup_row_blocks(stored: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Blocks of a block-diagonal Q (stored over row blocks of S weights) regrouped into row blocks of B.

    stored: (rows · ceil(cols/S), S, S) → (rows · ceil(cols/B), B, B); entry (j, k) is Q's when both columns
    fall in the same stored block, else 0 (Q has no coupling there); padding is zero.
    """
    rows, cols = shape
    size = stored.shape[-1]
    column = torch.arange(-(-cols // block_size) * block_size, device=stored.device).reshape(-1, block_size)
    valid = column < cols
    column = column.clamp_max(cols - 1)
    which, offset = column // size, column % size  # stored block within the row, position in it
    entries = stored.reshape(rows, -1, size, size)[:, which[:, :, None], offset[:, :, None], offset[:, None, :]]
    coupled = (which[:, :, None] == which[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return (entries * coupled).reshape(-1, block_size, block_size)


class CurvatureProvider(ABC):
    """An inverse-Fisher estimate Q ≈ (F + γI)⁻¹, block-diagonal over the prunable layers.

    Args:
        layers: module name → adapter, for every layer the provider covers.
        config: the method's `CurvatureConfig` subclass.
    """

    config_class: type[CurvatureConfig] = CurvatureConfig

    def __init__(self, layers: Mapping[str, LayerAdapter], config: CurvatureConfig) -> None:
        self.layers = dict(layers)
        self.config = config
        self.keep: dict[str, torch.Tensor] = {}

    @property
    def damping(self) -> float:
        return self.config.damping

    @abstractmethod
    def diag(self, name: str) -> torch.Tensor:
        """diag Q for layer `name`, shape (rows, cols), strictly positive."""

    @abstractmethod
    def matvec(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        """Q·V for V of shape (rows, cols) (weight coordinates only)."""

    def blocks(self, name: str, block_size: int) -> torch.Tensor:
        """Dense blocks of Q over consecutive weights of a row: (rows · ceil(cols/B), B, B).

        This default probes coordinate t of every block at once (B matvecs), so it is exact only
        when Q does not couple different blocks (diagonal Qs, block-diagonal Qs of the same
        blocking). Providers with coupled Q (Kronecker) override it with their entry formula.
        """
        rows, cols = self.layers[name].shape
        n_padded = -(-cols // block_size) * block_size
        columns = []
        for t in range(block_size):
            probe = torch.zeros(rows, n_padded, device=self.device(name))
            probe[:, t::block_size] = 1.0
            probe = probe[:, :cols]
            columns.append(row_blocks(self.matvec(name, probe), block_size))
        out = torch.stack(columns, dim=-1)  # [block, i, t] = Q[(block, i), (block, t)]
        valid = row_blocks(torch.ones(rows, cols, device=out.device), block_size)
        return out * valid[:, :, None] * valid[:, None, :]

    def device(self, name: str) -> torch.device:
        return self.layers[name].weight.device

    def prepare(self, model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """Estimate the curvature from calibration batches before the first pruning step."""
        return {}

    def update(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float]:
        """Refine the estimate from one batch (learned providers); returns diagnostics."""
        return {}

    def mask(self, name: str, keep: torch.Tensor) -> None:
        """Restrict Q to the surviving weights of layer `name` (`keep`: bool, (rows, cols))."""
        self.keep[name] = keep.to(torch.bool)

    def memory_bytes(self) -> int:
        """Bytes of curvature state (including any optimiser state)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor map of the provider's state (saved with safetensors)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": self.state_tensors(), "meta": {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = self.state_tensors()
        given = state.get("tensors", {})
        missing = sorted(set(expected) - set(given))
        extra = sorted(set(given) - set(expected))
        if missing or extra:
            raise CurvatureError(f"curvature state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, tensor in expected.items():
            if tuple(given[key].shape) != tuple(tensor.shape):
                raise CurvatureError(
                    f"curvature state `{key}` has shape {tuple(given[key].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(given[key])


_CONFIGS: dict[str, type[CurvatureConfig]] = {}
_PROVIDERS: dict[str, type[CurvatureProvider]] = {}


def register_curvature(name: str, provider_cls: type[CurvatureProvider]) -> None:
    """Register a curvature method under the recipe name `pruning.method: <name>`."""
    if not name.isidentifier() or name in _PROVIDERS:
        raise ValueError(f"cannot register curvature method {name!r}: invalid or already registered")
    _CONFIGS[name] = provider_cls.config_class
    _PROVIDERS[name] = provider_cls


def registered_methods() -> list[str]:
    return sorted(_PROVIDERS)


def config_class_for(method: str) -> type[CurvatureConfig]:
    if method not in _CONFIGS:
        raise RecipeError(f"recipe key `pruning.method` = {method!r} is unknown; registered: {', '.join(registered_methods())}")
    return _CONFIGS[method]


def provider_class_for(method: str) -> type[CurvatureProvider]:
    config_class_for(method)
    return _PROVIDERS[method]

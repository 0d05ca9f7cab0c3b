"""Block-diagonal Fisher inverse (oBERT / WoodFisher): B consecutive weights of a row per block.

Each layer's weights are flattened row-major into blocks of B consecutive weights of a row
(`row_blocks`, zero-padded at the row ends). Per block b, from m per-example gradients g_n,

    F_b = γI + (1/m) Σ_n g_{n,b} g_{n,b}ᵀ,        Q_b = F_b⁻¹        (stored: (nblocks, B, B) fp32).

oBERT (`EmpiricalBlockFisherInverse.add_grad`) reaches Q_b by m rank-1 Sherman–Morrison updates from
(1/γ)I. The result is the same matrix, so here the Gram Σ_n g gᵀ is accumulated in chunks (one
batched `baddbmm` per chunk of examples) and inverted once by a batched Cholesky in float64: equal to
the sequential Woodbury result up to rounding, and far faster (one B³ factorisation per block instead
of m B² updates, and no m-step sequential dependency).

Padded coordinates have zero gradients, so F_b = γ there: Q = 1/γ with no coupling; `diag` and
`blocks` drop them. Gradients are multiplied by the current keep mask (as oBERT does), so a pruned
coordinate likewise gets Q = 1/γ, uncoupled. `mask` takes effect at the next `prepare`, which the
pruner calls at every pruning step (`refines = False`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_mean_
from ..errors import CurvatureError
from ..progress import log_main
from .adapters import LayerAdapter
from .base import from_row_blocks, regroup_row_blocks, row_blocks
from .forward import model_device
from .gradients import GradientFisherConfig, GradientFisherProvider
from .likelihoods import Likelihood

_GRAM_CHUNK = 64  # examples per baddbmm
_INVERT_ELEMENTS = 2**22  # block entries per float64 Cholesky chunk (~32 MiB)


@dataclass
class BlockFisherConfig(GradientFisherConfig):
    """The `curvature:` section for `method: block_fisher`."""

    block_size: int = field(default=50, metadata={"help": "B: consecutive weights of a row per Fisher block (oBERT: 50). Memory: 4·B bytes per weight."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise CurvatureError(f"recipe key `curvature.block_size` = {self.block_size!r} must be >= 1")


def _invert_(gram: torch.Tensor, count: float, damping: float) -> None:
    """In place: gram (nblocks, B, B) ← (γI + gram / m)⁻¹ by batched Cholesky in float64, in chunks."""
    size = gram.shape[-1]
    eye = torch.eye(size, dtype=torch.float64, device=gram.device)
    for chunk in gram.split(max(1, _INVERT_ELEMENTS // (size * size))):
        factor, info = torch.linalg.cholesky_ex(chunk.double() / count + damping * eye)
        if bool((info > 0).any()):
            raise CurvatureError(f"block Fisher is not positive definite at `curvature.damping` = {damping}; raise the damping")
        chunk.copy_(torch.cholesky_inverse(factor))


class BlockFisherProvider(GradientFisherProvider):
    """Q = blockdiag_b (γI + G_b/m)⁻¹ over row blocks of B weights; before `prepare` Q = I/γ (magnitude).

    Example:
        >>> provider = BlockFisherProvider(resolve_targets(model, targets), BlockFisherConfig(block_size=50))
        >>> provider.prepare(model, calibration_batches)
        >>> provider.blocks("bert.encoder.layer.0.attention.self.query", 50)   # (rows · ⌈cols/50⌉, 50, 50)
    """

    config_class = BlockFisherConfig

    def __init__(self, layers: Mapping[str, LayerAdapter], config: BlockFisherConfig, likelihood: Likelihood | None = None) -> None:
        super().__init__(layers, config, likelihood)
        self.config: BlockFisherConfig = config
        self._check_memory()
        self.inverse = {name: self._identity(name) for name in self.layers}

    def _nblocks(self, name: str) -> int:
        rows, cols = self.layers[name].shape
        return rows * -(-cols // self.config.block_size)

    def _identity(self, name: str) -> torch.Tensor:
        eye = torch.eye(self.config.block_size, device=self.device(name)) / self.damping
        return eye.expand(self._nblocks(name), -1, -1).contiguous()

    def _reset_(self) -> None:
        """Q = I/γ in place (no allocation: may run after an out-of-memory error)."""
        for inverse in self.inverse.values():
            inverse.zero_().diagonal(dim1=-2, dim2=-1).fill_(1.0 / self.damping)

    def estimated_bytes(self) -> int:
        """Bytes of the stored inverse blocks, 4·B² per block: computable before allocating."""
        return sum(self._nblocks(name) for name in self.layers) * self.config.block_size**2 * 4

    def _check_memory(self) -> None:
        gib = self.estimated_bytes() / 2**30
        log_main(
            "Block Fisher inverse (B = %d) for %d layers: %.3f GiB estimated, plus one batch of per-example "
            "gradients (batch size × 4 bytes per weight) while estimating", self.config.block_size, len(self.layers), gib,
        )
        budget = self.config.max_memory_gib
        if budget is not None and gib > budget:
            raise CurvatureError(
                f"block Fisher inverse needs {gib:.2f} GiB > `curvature.max_memory_gib` = {budget}; lower "
                "`curvature.block_size` (memory is 4·B bytes per weight) or target fewer layers with `pruning.targets` "
                "(`curvature.num_grads` changes time, not memory)"
            )

    def prepare(self, model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """Q_b ← (γI + (1/m) Σ_n g_{n,b} g_{n,b}ᵀ)⁻¹ over `num_grads` examples; returns {"examples": m}.

        The stored inverse is reused as the Gram accumulator (no second copy); if the pass fails
        midway it is reset to I/γ before the error propagates.
        """
        block, count = self.config.block_size, 0
        try:
            for size, grads in self.gradients(model, batches, desc="Block Fisher"):
                if count == 0:
                    for gram in self.inverse.values():
                        gram.zero_()
                for name, g in grads.items():
                    # (b, rows, cols) → (b, nblocks, B); Gram[k] += Σ_n g_{n,k} g_{n,k}ᵀ, chunk by chunk.
                    g = row_blocks(g.reshape(-1, g.shape[-1]), block).reshape(size, -1, block)
                    for chunk in g.split(_GRAM_CHUNK):
                        self.inverse[name].baddbmm_(chunk.permute(1, 2, 0), chunk.transpose(0, 1))
                count += size
            total = torch.tensor([float(count)], device=model_device(model))
            all_reduce_mean_([total])
            for name, gram in self.inverse.items():
                all_reduce_mean_([gram])
                _invert_(gram, float(total), self.damping)
        except BaseException:
            if count:
                self._reset_()
            raise
        self.examples = count
        return {"examples": float(count)}

    def diag(self, name: str) -> torch.Tensor:
        """diag Q: (rows, cols), padding dropped."""
        return from_row_blocks(self.inverse[name].diagonal(dim1=-2, dim2=-1), self.layers[name].shape).clone()

    def matvec(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        """Q·V for V: (rows, cols): one (B × B)·(B) product per block."""
        inverse = self.inverse[name]
        blocks = row_blocks(vector.to(inverse.device, inverse.dtype), self.config.block_size)
        return from_row_blocks(torch.bmm(inverse, blocks[:, :, None])[:, :, 0], self.layers[name].shape)

    def blocks(self, name: str, block_size: int) -> torch.Tensor:
        """Q restricted to row blocks of `block_size` weights: (rows · ⌈cols/block_size⌉, block_size, block_size).

        The stored blocks (padding zeroed) when block_size == config.block_size; otherwise gathered
        exactly from them: entry (i, j) is Q's if both columns fall in the same stored block, else 0.
        """
        rows, cols = self.layers[name].shape
        stored = self.config.block_size
        inverse = self.inverse[name]
        if block_size == stored:
            valid = row_blocks(torch.ones(rows, cols, device=inverse.device), stored)
            return inverse * valid[:, :, None] * valid[:, None, :]
        return regroup_row_blocks(inverse, (rows, cols), block_size)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.inverse)

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
coordinate likewise gets Q = 1/γ, uncoupled. `mask` takes effect at the next `ready`, which the
pruner calls at every pruning step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..fisher.likelihoods import Likelihood
from ..fisher.statistics import block_fisher_inverse_, identity_blocks
from ..model.adapters import LayerAdapter
from ..model.blocks import from_row_blocks, regroup_row_blocks, row_blocks
from .base import Batches
from .config import BlockFisherConfig
from .gradient_fisher import GradientFisherProvider


class BlockFisherProvider(GradientFisherProvider):
    """Q = blockdiag_b (γI + G_b/m)⁻¹ over row blocks of B weights; before `ready` Q = I/γ (magnitude).

    Example:
        >>> provider = BlockFisherProvider(resolve_targets(model, targets), BlockFisherConfig(block_size=50))
        >>> provider.ready(model, calibration_batches)
        >>> provider.blocks("bert.encoder.layer.0.attention.self.query", 50)   # (rows · ⌈cols/50⌉, 50, 50)
    """

    config_class = BlockFisherConfig

    def __init__(
        self, layers: Mapping[str, LayerAdapter], config: BlockFisherConfig, likelihood: Likelihood | None = None
    ) -> None:
        super().__init__(layers, config, likelihood)
        self.config: BlockFisherConfig = config
        self.check_memory(
            f"Block Fisher inverse (B = {config.block_size})",
            "lower `curvature.block_size` (memory is 4·B bytes per weight) or target fewer layers with "
            "`pruning.targets` "
            "(`curvature.num_grads` changes time, not memory)",
            note=", plus one batch of per-example gradients (batch size × 4 bytes per weight) while estimating",
        )
        self.inverse = {
            name: identity_blocks(*a.shape, config.block_size, self.damping, a.weight.device)
            for name, a in self.layers.items()
        }

    @property
    def coupled_block(self) -> int:
        return self.config.block_size

    def _nblocks(self, name: str) -> int:
        rows, cols = self.layers[name].shape
        return rows * -(-cols // self.config.block_size)

    def estimated_bytes(self) -> int:
        """Bytes of the stored inverse blocks, 4·B² per block: computable before allocating."""
        return sum(self._nblocks(name) for name in self.layers) * self.config.block_size**2 * 4

    def estimate(self, model: nn.Module, batches: Batches) -> int:
        """Q_b ← (γI + (1/m) Σ_n g_{n,b} g_{n,b}ᵀ)⁻¹ over `num_grads` examples (`fisher.statistics`).

        The stored inverse is reused as the Gram accumulator (no second copy); if the pass fails
        midway it is reset to I/γ before the error propagates.
        """
        return block_fisher_inverse_(
            self.inverse, self.gradients(model, batches, "Block Fisher"), self.config.block_size, self.damping
        )

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

"""Fisher estimates accumulated from per-example gradients g_n (see `gradients.py`), averaged over ranks.

- `fisher_diagonal`: F_qq = (1/m) Σ_n g_{n,q}²  (OBD's Fisher diagonal);
- `block_fisher_inverse_`: per row block b of B consecutive weights,
  Q_b = (γI + (1/m) Σ_n g_{n,b} g_{n,b}ᵀ)⁻¹  (oBERT / WoodFisher).

oBERT reaches Q_b by m rank-1 Sherman–Morrison updates from (1/γ)I; the result is the same matrix, so here
the Gram Σ_n g gᵀ is accumulated in chunks (one batched `baddbmm` per chunk of examples) and inverted once
by a batched Cholesky in float64: equal to the sequential Woodbury result up to rounding, and far faster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..distributed import all_reduce_mean_
from ..errors import CurvatureError
from ..model.blocks import row_blocks

Gradients = Iterable[tuple[int, Mapping[str, torch.Tensor]]]

_GRAM_CHUNK = 64  # examples per baddbmm
_INVERT_ELEMENTS = 2**22  # block entries per float64 Cholesky chunk (~32 MiB)


def fisher_diagonal(
    gradients: Gradients, shapes: Mapping[str, tuple[int, int]], device: torch.device
) -> tuple[dict[str, torch.Tensor], int]:
    """name → F_qq (rows, cols) from (b, {name: g (b, rows, cols)}) pairs, and the number of local examples m."""
    sums = {name: torch.zeros(shape, device=device) for name, shape in shapes.items()}
    count = 0
    for size, grads in gradients:
        for name, g in grads.items():
            sums[name] += g.float().pow(2).sum(0)
        count += size
    total = torch.tensor([float(count)], device=device)
    all_reduce_mean_([*sums.values(), total])
    return {name: s / total for name, s in sums.items()}, count


def identity_blocks(rows: int, cols: int, block_size: int, damping: float, device: torch.device) -> torch.Tensor:
    """I/γ over the row blocks of a (rows, cols) layer: (rows · ceil(cols / B), B, B), the Q of an empty Fisher."""
    eye = torch.eye(block_size, device=device) / damping
    return eye.expand(rows * -(-cols // block_size), -1, -1).contiguous()


def block_fisher_inverse_(
    inverse: Mapping[str, torch.Tensor], gradients: Gradients, block_size: int, damping: float
) -> int:
    """In place: inverse[name] (nblocks, B, B) ← (γI + G_b / m)⁻¹ from (b, {name: g}) pairs; returns local m.

    The output tensors double as the Gram accumulators (no second copy); they are only written once the
    first gradients arrive, and set to I/γ if the pass fails after that (the error still propagates).
    """
    count = 0
    try:
        for size, grads in gradients:
            if count == 0:
                for gram in inverse.values():
                    gram.zero_()
            for name, g in grads.items():
                # (b, rows, cols) → (b, nblocks, B); Gram[k] += Σ_n g_{n,k} g_{n,k}ᵀ, chunk by chunk.
                g = row_blocks(g.reshape(-1, g.shape[-1]), block_size).reshape(size, -1, block_size)
                for chunk in g.split(_GRAM_CHUNK):
                    inverse[name].baddbmm_(chunk.permute(1, 2, 0), chunk.transpose(0, 1))
            count += size
        device = next(iter(inverse.values())).device
        total = torch.tensor([float(count)], device=device)
        all_reduce_mean_([total])
        for gram in inverse.values():
            all_reduce_mean_([gram])
            _invert_(gram, float(total), damping)
    except BaseException:
        if count:  # no allocation: this may run after an out-of-memory error
            for gram in inverse.values():
                gram.zero_().diagonal(dim1=-2, dim2=-1).fill_(1.0 / damping)
        raise
    return count


def _invert_(gram: torch.Tensor, count: float, damping: float) -> None:
    """In place: gram (nblocks, B, B) ← (γI + gram / m)⁻¹ by batched Cholesky in float64, in chunks."""
    size = gram.shape[-1]
    eye = torch.eye(size, dtype=torch.float64, device=gram.device)
    for chunk in gram.split(max(1, _INVERT_ELEMENTS // (size * size))):
        factor, info = torch.linalg.cholesky_ex(chunk.double() / count + damping * eye)
        if bool((info > 0).any()):
            raise CurvatureError(
                f"block Fisher is not positive definite at `curvature.damping` = {damping}; raise the damping"
            )
        chunk.copy_(torch.cholesky_inverse(factor))

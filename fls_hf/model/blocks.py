"""Row blocks: B consecutive weights of a row, the unit of block-diagonal curvature and joint OBS updates.

A (rows, cols) matrix view is cut row by row into ceil(cols / B) blocks of B weights, zero-padded at the
row end, so every block lies inside one row (one output unit). Groups: `size` consecutive rows or columns (an FFN
neuron's one, a head's `head_dim` per query head), the unit of structured pruning.
"""

from __future__ import annotations

import torch


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


def group_rows(groups: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the rows (or columns) of the given groups, `size` consecutive ones per group, group by group."""
    return (groups[:, None] * size + torch.arange(size, device=groups.device)).reshape(-1)


def any_in_groups(matrix: torch.Tensor, size: int) -> torch.Tensor:
    """bool (cols / size,): whether any entry of each group of `size` consecutive columns of `matrix` is non-zero."""
    return matrix.ne(0).reshape(matrix.shape[0], -1, size).any(dim=(0, 2))

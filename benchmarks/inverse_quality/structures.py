"""Structures of an inverse Fisher (full, per layer, within-row blocks, diagonal, Kronecker) and the exact
references of each: M⁻¹ projected on it, its aux-loss optimum, the nearest Kronecker product."""

from __future__ import annotations

import torch

from .problem import Problem

BLOCK = 16  # within-row block size of the block_diagonal structures (divides both layers' widths, 16 and 32)


def index_groups(shapes: dict[str, tuple[int, int]], structure: str) -> list[torch.Tensor]:
    """Partition of the weight indices: one group (full), per layer, per within-row block of BLOCK, or singletons."""
    groups, start = [], 0
    for rows, cols in shapes.values():
        idx = torch.arange(start, start + rows * cols)
        start += rows * cols
        if structure == "layer":
            groups.append(idx)
        elif structure == "block_diagonal":
            groups.extend(idx.reshape(rows, -1, BLOCK).reshape(-1, BLOCK))
        elif structure == "diagonal":
            groups.extend(idx.reshape(-1, 1))
    return [torch.arange(start)] if structure == "full" else groups


def blockwise_inverse(matrix: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Dense matrix whose group blocks are the inverses of `matrix`'s blocks (0 between groups)."""
    out = torch.zeros_like(matrix)
    for idx in groups:
        out[idx[:, None], idx[None, :]] = torch.linalg.inv(matrix[idx[:, None], idx[None, :]])
    return out


def projection(matrix: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """`matrix` with its entries between different groups set to 0 (the Frobenius-nearest of that structure)."""
    out = torch.zeros_like(matrix)
    for idx in groups:
        out[idx[:, None], idx[None, :]] = matrix[idx[:, None], idx[None, :]]
    return out


def nearest_kronecker(matrix: torch.Tensor, shapes: dict[str, tuple[int, int]]) -> torch.Tensor:
    """Per layer, the Frobenius-nearest B ⊗ C (rows² ⊗ cols², row-major weights): rank-1 SVD (Van Loan–Pitsianis)."""
    out, start = torch.zeros_like(matrix), 0
    for rows, cols in shapes.values():
        n = rows * cols
        block = matrix[start : start + n, start : start + n]
        rearranged = block.reshape(rows, cols, rows, cols).permute(0, 2, 1, 3).reshape(rows * rows, cols * cols)
        u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
        left, right = (s[0].sqrt() * u[:, 0]).reshape(rows, rows), (s[0].sqrt() * vh[0]).reshape(cols, cols)
        out[start : start + n, start : start + n] = torch.kron(left, right)
        start += n
    return out


def references(problem: Problem, gamma: float) -> dict[str, torch.Tensor]:
    """Per structure: M⁻¹ projected on it (the Frobenius-nearest Q of that structure) and its aux-loss optimum
    (the blocks of M inverted: the OBS-optimal Q when compensation stays inside the blocks)."""
    m = problem.fisher + gamma * torch.eye(len(problem.w), dtype=torch.float64)
    exact = torch.linalg.inv(m)
    out = {}
    for structure in ("full", "layer", "block_diagonal", "diagonal"):
        groups = index_groups(problem.shapes, structure)
        out[f"{structure}/projection"] = projection(exact, groups)
        out[f"{structure}/aux_optimum"] = blockwise_inverse(m, groups)
    out["kronecker/nearest_kronecker"] = nearest_kronecker(exact, problem.shapes)
    return out

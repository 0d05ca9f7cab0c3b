"""Row-wise OBC: exact OBS inside each row of a layer whose Hessian is blockdiag_i(G_ii · H), H shared by the rows.

Keeping the within-row part of a Kronecker Fisher, ΔL ≈ ½ Σ_i G_ii Δw_iᵀ H Δw_i (H = Ā + λI: SparseGPT's row
problem, weighted by the output-side Fisher G_ii). Then, with H⁻¹ the one inverse all rows share:

- saliency of weight (i, j) alone: ρ_ij = G_ii w_ij² / (2 [H⁻¹]_jj), in loss units, so one global threshold
  allocates sparsity across rows and layers;
- compensation for the pruned set P_i of row i (every pruned weight of the row, earlier ones included, so the
  update is restricted to the kept coordinates): the exact joint OBS update
  δw_i = −H⁻¹[:, P_i] (H⁻¹_{P_i P_i})⁻¹ w_{i, P_i}, after which w_{i, P_i} = 0 exactly. G_ii cancels here.

Rows are solved in chunks of batched Cholesky systems over their pruned coordinates only (padded to the chunk's
largest |P_i|): memory ~ chunk · |P|², time ~ rows · |P|³ / 3 per layer. Pure tensor maths in float64.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 2**24  # rows · |P|² float64 entries per batched solve (~128 MiB)


def obc_saliency(weight: torch.Tensor, row_weight: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """ρ_ij = G_ii w_ij² / (2 [H⁻¹]_jj).

    Args:
        weight: (rows, cols) W.
        row_weight: (rows,) G_ii (non-negative).
        inverse: (cols, cols) H⁻¹ (positive definite).

    Returns:
        (rows, cols) float64 saliencies.
    """
    w = weight.double()
    return row_weight.double().clamp_min(0)[:, None] * w.square() / (2 * inverse.diagonal().double()[None, :])


def obc_compensation(weight: torch.Tensor, inverse: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Exact joint OBS update of every row for its pruned set: δW with (W + δW) zero on `pruned`.

    Args:
        weight: (rows, cols) W.
        inverse: (cols, cols) H⁻¹ shared by the rows.
        pruned: bool (rows, cols), True on every pruned weight (earlier pruned weights stay at zero).

    Returns:
        (rows, cols) float64 δW; rows without pruned weights get 0.
    """
    w, h_inv = weight.double(), inverse.double()
    delta = torch.zeros_like(w)
    counts = pruned.sum(dim=1)
    active = (counts > 0).nonzero().squeeze(1)
    if not len(active):
        return delta
    order = active[torch.argsort(counts[active])]  # similar |P_i| share a chunk: less padding
    step = max(1, _CHUNK_ELEMENTS // int(counts.max()) ** 2)
    for start in range(0, len(order), step):
        rows = order[start : start + step]
        delta[rows] = _solve_rows(w[rows], h_inv, pruned[rows])
    return delta


def _solve_rows(w: torch.Tensor, h_inv: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """δ for a chunk of rows: x = (H⁻¹_PP)⁻¹ w_P on each row's pruned columns (padding: identity), δ = −H⁻¹[:, P] x."""
    width = int(pruned.sum(dim=1).max())
    # pruned column indices of each row, padded at the end with a copy of its last one (masked out below)
    rank = torch.argsort((~pruned).to(torch.int8), dim=1, stable=True)[:, :width]
    real = torch.arange(width, device=w.device)[None, :] < pruned.sum(dim=1, keepdim=True)
    system = h_inv[rank[:, :, None], rank[:, None, :]]
    both = real[:, :, None] & real[:, None, :]
    eye = torch.eye(width, dtype=system.dtype, device=system.device).expand_as(system)
    system = torch.where(both, system, eye)
    rhs = torch.where(real, torch.gather(w, 1, rank), 0.0)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info != 0).any()):  # H⁻¹_PP is positive definite in exact arithmetic; a relative jitter rescues rounding
        jitter = 1e-10 * system.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
        factor = torch.linalg.cholesky(system + jitter)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    return -(x.unsqueeze(1) @ h_inv[rank]).squeeze(1)

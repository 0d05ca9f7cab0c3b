"""Row-wise OBC: exact OBS inside each row of a layer whose damped Fisher is blockdiag_i(G_ii Ā + γI).

Keeping the within-row part of a Kronecker Fisher (diag G ⊗ Ā), with the damping γ of Q ≈ (F + γI)⁻¹, row i of
W is an OBS problem of its own with Hessian H_i = G_ii Ā + γI (SparseGPT's row problem, Ā ∝ XXᵀ, weighted by
the output-side Fisher G_ii). One eigenbasis Ā = U diag(λ) Uᵀ serves every row: H_i⁻¹ = U diag(1/(G_ii λ + γ)) Uᵀ.

- saliency of weight (i, j) alone: ρ_ij = w_ij² / (2 [H_i⁻¹]_jj), the loss increase under the row model, so one
  global threshold allocates sparsity across rows and layers (a row with a tiny G_ii is damped towards
  magnitude pruning, ρ → γ w²/2, rather than freed);
- compensation for the pruned set P_i of row i (every pruned weight of the row, earlier ones included, so the
  update stays on the kept coordinates): the exact joint OBS update δw_i = −H_i⁻¹[:, P_i] (H_i⁻¹[P_i, P_i])⁻¹ w_{i,P_i},
  after which w_{i, P_i} = 0 exactly.

Rows are solved in chunks of batched Cholesky systems over their pruned coordinates only (padded to the chunk's
largest |P_i|): time ~ rows · |P| · cols · (|P| + 1) per layer. Pure tensor maths in float64.
"""

from __future__ import annotations

import torch

from ..curvature.base import RowModel

_CHUNK_ELEMENTS = 2**24  # rows · |P| · cols float64 entries per batched solve (~128 MiB)


def obc_saliency(weight: torch.Tensor, model: RowModel) -> torch.Tensor:
    """ρ_ij = w_ij² / (2 [H_i⁻¹]_jj): (rows, cols) float64."""
    return weight.double().square() / (2 * model.inverse_diag())


def obc_compensation(weight: torch.Tensor, model: RowModel, pruned: torch.Tensor) -> torch.Tensor:
    """Exact joint OBS update of every row for its pruned set: δW with (W + δW) zero on `pruned`.

    Args:
        weight: (rows, cols) W.
        model: the layer's `RowModel`.
        pruned: bool (rows, cols), True on every pruned weight (earlier pruned weights stay at zero).

    Returns:
        (rows, cols) float64 δW; rows without pruned weights get 0.
    """
    w = weight.double()
    delta = torch.zeros_like(w)
    counts = pruned.sum(dim=1)
    active = (counts > 0).nonzero().squeeze(1)
    if not len(active):
        return delta
    order = active[torch.argsort(counts[active])]  # similar |P_i| share a chunk: less padding
    step = max(1, _CHUNK_ELEMENTS // (int(counts.max()) * w.shape[1]))
    for start in range(0, len(order), step):
        rows = order[start : start + step]
        delta[rows] = _solve_rows(w[rows], model, rows, pruned[rows])
    return delta


def _solve_rows(w: torch.Tensor, model: RowModel, rows: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """δ for a chunk of rows: x = (H_i⁻¹[P, P])⁻¹ w_P (padding: identity), δ_i = −H_i⁻¹[:, P] x = −U (d_i ⊙ U_Pᵀ x)."""
    counts = pruned.sum(dim=1, keepdim=True)
    width = int(counts.max())
    # pruned column indices of each row (stable order), padded with kept ones that the mask `real` switches off
    index = torch.argsort((~pruned).to(torch.int8), dim=1, stable=True)[:, :width]
    real = torch.arange(width, device=w.device)[None, :] < counts
    spectrum = model.spectrum(rows)  # (c, cols)
    basis_p = model.basis[index] * real[:, :, None]  # (c, p, cols): rows of U at the pruned columns
    system = (basis_p * spectrum[:, None, :]) @ basis_p.transpose(1, 2)
    eye = torch.eye(width, dtype=system.dtype, device=system.device)
    system = system + eye * (~real)[:, :, None]
    rhs = torch.where(real, torch.gather(w, 1, index), 0.0)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool(
        (info != 0).any()
    ):  # H_i⁻¹[P, P] is positive definite in exact arithmetic; a relative jitter rescues rounding
        scale = system.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
        factor = torch.linalg.cholesky(system + 1e-10 * scale * eye)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), factor)  # (c, p, 1)
    coefficients = (basis_p.transpose(1, 2) @ x).squeeze(-1) * spectrum  # d_i ⊙ U_Pᵀ x: (c, cols)
    return -coefficients @ model.basis.T

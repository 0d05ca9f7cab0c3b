"""The row-wise OBC update by preconditioned conjugate gradients (`pruning.obc_solver: cg`).

Row i's joint OBS update solves H_KK δ_K = H_KP w_P with H = G_ii Ā + γI on its kept set K (`obc.py`). A
factorisation costs ~|K|³ per row, or |P|²·cols for the dual form, whichever is cheaper: near 50 % sparsity both
are large, and they are batched triangular work that runs far below GEMM speed. Conjugate gradients instead take
every row of a layer at once, each iteration one GEMM with Ā for H_KK x, preconditioned per row by a low-rank
Woodbury inverse (`LowRankWoodbury`): Ā's top cols / 24 eigenpairs restricted to K exactly, the rest of Ā by its
diagonal. What makes H_KK hard is Ā's few large eigenvalues, and restricted to K they stay exact at any |K|, so
the rows converge in 5–11 iterations on average whatever their sparsity (MiniLM's layers, real activations).

Session 16 replaced the earlier preconditioner [H_i⁻¹]_KK (the whole row Hessian's inverse restricted to K, through
Ā's eigenbasis: two cols² GEMMs per application, and it misses the Schur term that grows as K shrinks to half the
row). `benchmarks/cg_preconditioner` (every layer problem of one-shot MiniLM runs, 2 CPU cores, AVX2), CPU-s over
the 36 layers, this / the old / the factorisations: 2:4 7.9 / 18.4 / 88.1, 50 % 9.3 / 17.1 / 75.6, 80 % 5.9 / 12.6 /
28.0; each update's loss within 1e-4 of the exact update's at the default tolerance (the old one at its own:
within 9.3e-4); 5 rows of 20,736 at 50 % needed more than `max_iterations` and are factored.

The iteration stops per row when the preconditioned residual falls below `tolerance` × its start value; rows that do
not get there in `max_iterations` are returned for the exact solve. All in float32 (the tolerance is far above its
rounding); the caller keeps δ_P = −w_P exact.
"""

from __future__ import annotations

import torch

from ..curvature.base import RowModel

CG_TOLERANCE = 5e-3  # preconditioned residual, relative to its start: the update's loss within 1e-3 of the optimum's
CG_ITERATIONS = 40  # per layer at most; rows not converged by then take the exact solve
# a row's expected iterations to the tolerance, flat in the width as the rank grows with it (MiniLM, 384 and 1,536
# columns, 20–80 % sparsity: 5–11 on average per layer, at most 23)
CG_EXPECTED_ITERATIONS = 12
# rank = cols / 24: 16 at 384 columns, 64 at 1,536 (on MiniLM's layers the fastest of cols / 12, 24 and 48)
WOODBURY_RANK_DIVISOR = 24
# wider layers (Llama's 4,096 / 11,008 columns): bounds the set-up (rows · cols · rank²) and the rank² floats kept
# per row; not tuned there
WOODBURY_MAX_RANK = 128
_OUTER_CHUNK = 2**22  # floats of the rank² outer products of Ā's eigenvectors built at a time (16 MiB)


def woodbury_rank(cols: int) -> int:
    return min(cols, WOODBURY_MAX_RANK, max(8, cols // WOODBURY_RANK_DIVISOR))


def cg_row_flops(cols: int) -> float:
    """A row's expected cost in flops, for choosing between it and the exact factorisation (`obc.obc_solve`): per
    iteration 2 cols² for H_KK x and ~4 rank·cols for the preconditioner, `CG_EXPECTED_ITERATIONS` of them, and the
    preconditioner's set-up (2 rank² cols)."""
    rank = woodbury_rank(cols)
    return CG_EXPECTED_ITERATIONS * (2 * cols * cols + 4 * rank * cols) + 2 * rank * rank * cols


class LowRankWoodbury:
    """M_i = (D_i + G_ii V_K Λ V_Kᵀ)⁻¹ on K: Ā's top `rank` eigenpairs (V, Λ) restricted to the kept columns, the
    rest of Ā by its diagonal (D_i = G_ii diag(Ā − V Λ Vᵀ) + γI), inverted by Woodbury with one rank × rank
    matrix per row, I + S Vᵀ D⁻¹ V S (S = (G_ii Λ)^½; its eigenvalues are ≥ 1). Ā's few large eigenvalues
    are what make H_KK ill-conditioned, and here they are restricted to K exactly, so the preconditioner keeps its
    quality at any |K|; an application costs ~4 rank × cols per row instead of 2 cols²."""

    def __init__(self, model: RowModel, a_bar: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor):
        dtype = mask.dtype
        rank = woodbury_rank(len(a_bar))
        top = torch.argsort(model.eigenvalues, descending=True)[:rank]
        vectors, eigenvalues = model.basis[:, top], model.eigenvalues[top].clamp_min(0.0)  # (cols, rank), (rank,)
        self.vectors = vectors.to(dtype)
        weight = model.row_weight[rows, None]
        diagonal = a_bar.diagonal().double()
        # the rest of Ā's diagonal, floored so that D stays positive without damping (γ = 0: a learned Q's factors)
        residual = (diagonal - (vectors.square() * eigenvalues).sum(dim=1)).clamp_min(1e-6 * float(diagonal.mean()))
        self.inverse_diag = mask / (weight * residual + model.damping).to(dtype)  # D⁻¹ on K, 0 off it
        self.scale = (weight * eigenvalues).sqrt().to(dtype)  # (n, rank)
        # Vᵀ D_i⁻¹ V for every row as one GEMM with the rows of V's outer products, a chunk of columns at a time
        small = mask.new_zeros(len(mask), rank * rank)
        step = max(1, _OUTER_CHUNK // (rank * rank))
        for start in range(0, len(self.vectors), step):
            v = self.vectors[start : start + step]
            small += self.inverse_diag[:, start : start + step] @ (v[:, :, None] * v[:, None, :]).flatten(1)
        small = small.view(-1, rank, rank) * self.scale[:, :, None] * self.scale[:, None, :]
        small.diagonal(dim1=-2, dim2=-1).add_(1.0)
        factor, info = torch.linalg.cholesky_ex(small)
        # (n, rank, rank); a row whose matrix float32 rounding made indefinite (eigenvalues ≥ 1 in exact arithmetic,
        # so only without damping and with a huge spread) keeps the diagonal part alone: slower, still SPD
        self.small_inverse = torch.where((info == 0)[:, None, None], torch.cholesky_inverse(factor), 0.0)

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        y = r * self.inverse_diag
        t = (self.small_inverse @ ((y @ self.vectors) * self.scale).unsqueeze(-1)).squeeze(-1) * self.scale
        return y - (t @ self.vectors.T) * self.inverse_diag

    def select(self, index: torch.Tensor) -> None:
        self.inverse_diag, self.scale, self.small_inverse = (
            self.inverse_diag[index],
            self.scale[index],
            self.small_inverse[index],
        )


def cg_rows(
    coupling: torch.Tensor,
    a_bar: torch.Tensor,
    model: RowModel,
    rows: torch.Tensor,
    keep: torch.Tensor,
    *,
    tolerance: float = CG_TOLERANCE,
    max_iterations: int = CG_ITERATIONS,
    preconditioner_class: type = LowRankWoodbury,
) -> tuple[torch.Tensor, torch.Tensor]:
    """δ_K ≈ (H_KK)⁻¹ (coupling)_K for the given rows of a layer, by preconditioned conjugate gradients.

    Args:
        coupling: (n, cols) float64, (H w_P) of each of the rows (only K is read).
        a_bar: (cols, cols) float64 Ā.
        model: the layer's `RowModel` (S = I).
        rows: (n,) indices of the rows in the layer (their G_ii).
        keep: bool (n, cols), each row's kept set K.
        preconditioner_class: built as (model, a_bar, rows, mask as float32), applied to (n', cols) residuals,
            `select(index)` keeps the rows still iterated (`LowRankWoodbury`; benchmarks pass others).

    Returns:
        (x, converged): (n, cols) float64 δ, zero off K; bool (n,), False where `max_iterations` did not reach the
        tolerance (x is then the last iterate: the caller solves those rows exactly).
    """
    dtype = torch.float32
    a = a_bar.to(dtype)
    weight = model.row_weight[rows].to(dtype)[:, None]
    mask = keep.to(dtype)
    tiny = torch.finfo(dtype).tiny
    preconditioner = preconditioner_class(model, a_bar, rows, mask)

    def operator(x):  # H_KK x for every row still iterated, x zero off K (reads the working set as compacted)
        return ((x @ a) * weight + model.damping * x) * mask

    b = coupling.to(dtype) * mask
    solution = torch.zeros_like(b)
    converged = torch.zeros(len(b), dtype=torch.bool, device=b.device)
    place = torch.arange(len(b), device=b.device)  # the rows still iterated, as rows of `b`
    x = torch.zeros_like(b)
    r = b.clone()
    z = preconditioner(r)
    p = z.clone()
    rz = (r * z).sum(dim=1)
    stop = rz * tolerance**2  # rᵀM r shrinks as the squared residual
    active = rz > 0  # a row with nothing to compensate is done at x = 0
    for _ in range(max_iterations):
        if not bool(active.any()):
            break
        if 4 * int(active.sum()) <= 3 * len(active):  # a quarter of the rows done: iterate on the others only
            done = ~active
            solution[place[done]], converged[place[done]] = x[done], True
            place, x, r, p, rz, stop, mask, weight = (t[active] for t in (place, x, r, p, rz, stop, mask, weight))
            preconditioner.select(active)
            active = active[active]
        hp = operator(p)
        curvature = (p * hp).sum(dim=1)
        alpha = torch.where(active, rz / curvature.clamp_min(tiny), 0.0)[:, None]
        x += alpha * p
        r -= alpha * hp
        z = preconditioner(r)
        rz_next = (r * z).sum(dim=1)
        beta = torch.where(active, rz_next / rz.clamp_min(tiny), 0.0)[:, None]
        p = z + beta * p
        rz = rz_next
        active &= rz > stop
    solution[place], converged[place] = x, ~active
    return solution.double(), converged

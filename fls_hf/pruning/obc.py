"""Row-wise OBC: exact OBS inside each row of a layer whose damped Fisher is blockdiag_i(G_ii Ā + γI).

Keeping the within-row part of a Kronecker Fisher (diag G ⊗ Ā), with the damping γ of Q ≈ (F + γI)⁻¹, row i of
W is an OBS problem of its own with Hessian H_i = G_ii Ā + γI (SparseGPT's row problem, Ā ∝ XXᵀ, weighted by
the output-side Fisher G_ii). With K_i the kept and P_i the pruned coordinates of row i:

- saliency of kept weight (i, j): ρ_ij = w_ij² / (2 [(H_i)_KK⁻¹]_jj), the loss increase of removing it while the
  other kept weights move optimally and the pruned ones stay at zero. In loss units, so one global threshold
  allocates sparsity across rows and layers (a row with a tiny G_ii is damped towards magnitude pruning,
  ρ → γ w²/2). With nothing pruned yet, one eigenbasis Ā = U diag(λ) Uᵀ gives every row's diagonal at once.
- compensation for the pruned set (every pruned weight of the row, earlier ones included, so the update stays on
  the kept coordinates): the exact joint OBS update, in the primal form δw_K = (H_i)_KK⁻¹ (H_i)_KP w_P =
  G_ii (G_ii Ā_KK + γI)⁻¹ (Ā w_P)_K, after which w_P = 0 exactly. One Cholesky of a |K|×|K| matrix per row: cheaper
  than the dual form through H_i⁻¹[P, P] (|P|² · cols per row) at every sparsity, most of all at high sparsity.

`obc_solve` gives both from one factorisation: the compensation for a new mask, and the diagonal the next round's
saliencies need (`pruning.obc_rounds` re-ranks the survivors this way between sub-steps, towards greedy OBC).
Rows are solved in chunks of batched Cholesky factorisations of their kept coordinates (padded to the chunk's
largest |K_i| with identity): time ~ rows · |K|³ per layer. Pure tensor maths in float64, except that a
compensation alone (no diagonal asked) factors in float32 and refines in float64 to float64-level residuals
(`_refined`; ill-conditioned chunks fall back to float64 factors): half the time, the same result. A learned
Kronecker Q adds an elementwise scale (H_i = S_i⁻¹ (G_ii Ā + γI) S_i⁻¹, `RowModel.column_scale`), solved in
scaled coordinates.
"""

from __future__ import annotations

import torch

from ..curvature.base import RowModel
from .conjugate_gradient import cg_row_flops, cg_rows

_CHUNK_ELEMENTS = 2**23  # rows · |K|² float64 entries per batched factorisation (64 MiB; a few copies live at once)
_SWEEP_BLOCK = 128  # columns per lazy batch of the sweep (SparseGPT's B)
_REFINEMENTS = 4  # float64 refinement steps of a float32-factored solve before falling back to float64 factors
_REFINED_RESIDUAL = 1e-10  # relative (to the row's largest right-hand side) residual a refined solve must reach
_FACTOR_SLOWDOWN = 12.0  # batched Cholesky / triangular solves per flop against a GEMM's, CPU (`cg_rows` choice)
_FACTOR_OVERHEAD = 60.0  # × cols² GEMM flops per factored row besides: the gather, the padding, the refinement


def obc_saliency(weight: torch.Tensor, model: RowModel, keep: torch.Tensor | None = None) -> torch.Tensor:
    """ρ_ij = w_ij² / (2 [(H_i)_KK⁻¹]_jj) on kept weights (0 on pruned ones): (rows, cols) float64.

    Args:
        weight: (rows, cols) W, zero on pruned coordinates.
        model: the layer's `RowModel`.
        keep: bool (rows, cols) current mask; None: nothing pruned yet.
    """
    if keep is None or bool(keep.all()):
        return weight.double().square() / (2 * model.inverse_diag())
    _, inverse_diag = obc_solve(weight, model, keep, inverse_diag=True)
    return torch.where(keep, weight.double().square() / (2 * inverse_diag), 0.0)


def obc_compensation(weight: torch.Tensor, model: RowModel, pruned: torch.Tensor) -> torch.Tensor:
    """Exact joint OBS update of every row for its pruned set: δW with (W + δW) zero on `pruned`.

    Args:
        weight: (rows, cols) W.
        model: the layer's `RowModel`.
        pruned: bool (rows, cols), True on every pruned weight (earlier pruned weights stay at zero).

    Returns:
        (rows, cols) float64 δW; rows without pruned weights get 0.
    """
    delta, _ = obc_solve(weight, model, ~pruned, inverse_diag=False)
    return delta


def obc_solve(
    weight: torch.Tensor, model: RowModel, keep: torch.Tensor, *, inverse_diag: bool, cg_tolerance: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """OBS compensation δW for the mask `keep`, and (if asked) [(H_i)_KK⁻¹]_jj on the kept coordinates.

    `cg_tolerance` > 0 (compensation only): rows whose factorisation would cost more than conjugate gradients are
    solved by them to that relative residual (`conjugate_gradient.cg_rows`), the others (and any that do not
    converge) exactly.

    Returns:
        (δW, diagonal): (rows, cols) float64 each, (W + δW)_P = 0; the diagonal is 1 off K (never read there),
        None unless asked for.
    """
    if model.column_scale is not None:
        # H_i = S_i⁻¹ (G_ii Ā + γI) S_i⁻¹: in the coordinates W ⊘ S every row shares Ā; the loss, the mask and the
        # zeros are the same there, so solve there and map back (δW = S δW', [(H_i)_KK⁻¹]_jj = s_ij² [·]'_jj)
        scale, keep = model.column_scale, keep.to(torch.bool)
        delta, diagonal = obc_solve(
            weight.double() / scale, model.unscaled(), keep, inverse_diag=inverse_diag, cg_tolerance=cg_tolerance
        )
        return _scaled_back(delta, scale, weight, ~keep), None if diagonal is None else diagonal * scale.square()
    w = weight.double()
    keep = keep.to(torch.bool)
    pruned_w = torch.where(keep, 0.0, w)
    # (Ā w_P) for every row at once; rows with nothing pruned get no update
    a_bar = model.a_bar()
    coupling = (pruned_w @ a_bar) * model.row_weight[:, None]
    delta = -pruned_w  # (W + δW)_P = 0 exactly
    diagonal = torch.ones_like(w) if inverse_diag else None
    counts = keep.sum(dim=1)
    full = counts == w.shape[1]
    if diagonal is not None and bool(full.any()):  # nothing pruned in the row: the eigenbasis gives it directly
        diagonal[full] = model.spectrum(full) @ model.basis.square().T
    active = ~full & (counts > 0)
    if diagonal is None:  # a row whose pruned weights are all zero already (pruned earlier) has δ = 0 exactly
        active &= pruned_w.ne(0).any(dim=1)
    active = active.nonzero().squeeze(1)
    if not len(active):
        return delta, diagonal
    # each row in the cheaper of the two exact forms (flop counts below); widest first, so the first row of a
    # chunk sets its size, and rows of similar width share a chunk (less padding)
    cols, kept = w.shape[1], counts.double()
    lost = cols - kept
    if diagonal is None:
        dual_cost, primal_cost = lost.square() * cols + lost.pow(3) / 3, kept.pow(3) / 3
        dual = dual_cost < primal_cost
        if cg_tolerance > 0:
            factored = torch.minimum(dual_cost, primal_cost)
            active = _by_conjugate_gradients(coupling, a_bar, model, keep, active, factored, cg_tolerance, delta)
    else:
        dual = cols * cols * lost + cols * lost.square() + lost.pow(3) / 3 < kept.pow(3)
    for use_dual in (True, False):
        group = active[dual[active] == use_dual]
        order = group[torch.argsort(counts[group], descending=not use_dual, stable=True)]
        start = 0
        while start < len(order):
            first = order[start]
            size = cols * int(lost[first]) if use_dual else int(kept[first]) ** 2
            rows = order[start : start + max(1, _CHUNK_ELEMENTS // max(1, size))]
            start += len(rows)
            solve = _dual_rows if use_dual else _primal_rows
            solve(w, coupling, a_bar, model, rows, keep[rows], delta, diagonal)
    return delta, diagonal


def _by_conjugate_gradients(coupling, a_bar, model, keep, active, factored, tolerance, delta) -> torch.Tensor:
    """Solve the active rows whose factorisation (`factored`: each row's flops in the cheaper exact form) costs more
    than conjugate gradients' expected iterations by them (into `delta`); returns the rows left for the
    factorisations. In GEMM flops: batched factorisations run at about a twelfth of GEMM speed on CPU
    (`_FACTOR_SLOWDOWN`), and a factored row pays ~60 cols² besides (`_FACTOR_OVERHEAD`; both fitted on MiniLM's B1
    problems, 2 CPU cores, AVX-512). With the low-rank Woodbury preconditioner a row costs ~12 iterations of
    ~2 cols², below the factorisations' fixed cost alone, so every MiniLM row iterates (`benchmarks/cg_preconditioner`,
    AVX2: 4.8–11× less CPU than factorising every row at 80 % / 50 % / 2:4); rows that do not converge are factored."""
    cols = keep.shape[1]
    chosen = _FACTOR_SLOWDOWN * factored[active] + _FACTOR_OVERHEAD * cols * cols > cg_row_flops(cols)
    rows = active[chosen]
    if not len(rows):
        return active
    x, converged = cg_rows(coupling[rows], a_bar, model, rows, keep[rows], tolerance=tolerance)
    delta[rows[converged]] += x[converged]
    return torch.cat([active[~chosen], rows[~converged]])


def _primal_rows(w, coupling, a_bar, model, rows, keep, delta, diagonal) -> None:
    """δ_K = (H_KK)⁻¹ (H_KP w_P) and diag (H_KK)⁻¹ from one Cholesky per row, written into `delta` / `diagonal`."""
    if diagonal is None:
        x_full = _refined_solve(coupling[rows], a_bar, model, rows, keep)
        if x_full is not None:
            delta[rows] += x_full
            return
    index, real, factor = _kept_factor(a_bar, model, rows, keep)
    rhs = torch.where(real, torch.gather(coupling[rows], 1, index), 0.0)
    x = _cholesky_solve(rhs, factor)
    delta[rows] += torch.zeros_like(w[rows]).scatter_add(1, index, torch.where(real, x, 0.0))
    if diagonal is not None:
        # diag (LLᵀ)⁻¹ = column sums of (L⁻¹)²: one batched triangular solve (BLAS-3), ~20× faster on CPU than
        # torch.cholesky_inverse on 1,000² blocks
        eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device).expand_as(factor)
        inv = torch.linalg.solve_triangular(factor, eye, upper=False).square().sum(dim=-2)
        placed = torch.zeros_like(w[rows]).scatter_add(1, index, torch.where(real, inv, 0.0))  # padding adds 0
        diagonal[rows] = torch.where(keep, placed, 1.0)


def _dual_rows(w, coupling, a_bar, model, rows, keep, delta, diagonal) -> None:
    """The same through H⁻¹ = U diag(1/(G_ii λ + γ)) Uᵀ (cheaper while few weights of the row are pruned):
    x = (H⁻¹_PP)⁻¹ w_P, δ = −H⁻¹[:, P] x; diag (H_KK)⁻¹ = diag H⁻¹ − diag(H⁻¹_KP (H⁻¹_PP)⁻¹ H⁻¹_PK)."""
    pruned = ~keep
    counts = pruned.sum(dim=1, keepdim=True)
    width = int(counts.max())
    index = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, :width]
    real = torch.arange(width, device=keep.device)[None, :] < counts
    spectrum = model.spectrum(rows)  # (c, cols)
    # rows of U at the pruned columns, (c, p, cols); padding reads an appended zero row
    basis_p = torch.cat([model.basis, model.basis.new_zeros(1, w.shape[1])])[torch.where(real, index, w.shape[1])]
    rhs = torch.where(real, torch.gather(w[rows], 1, index), 0.0)
    x = None
    if diagonal is None:  # float32 factors, refined in float64 (`_refined`)
        factor = _factor_32(_pruned_inverse(basis_p, spectrum, real, torch.float32))
        if factor is not None:

            def apply(x):  # H⁻¹_PP x in float64
                return (
                    basis_p @ (spectrum * (basis_p.transpose(1, 2) @ x.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)
                ).squeeze(-1)

            x = _refined(rhs, real, factor, apply)
    if x is None:  # (and always when the diagonal is asked for)
        factor = _cholesky(_pruned_inverse(basis_p, spectrum, real, torch.float64))
        x = _cholesky_solve(rhs, factor)
    x = x.unsqueeze(-1)  # (c, p, 1)
    step = -((basis_p.transpose(1, 2) @ x).squeeze(-1) * spectrum) @ model.basis.T  # −H⁻¹[:, P] x
    delta[rows] = torch.where(pruned, delta[rows], step)  # (W + δW)_P = 0 exactly, as the caller set it
    if diagonal is not None:
        columns = (basis_p * spectrum[:, None, :]) @ model.basis.T  # H⁻¹[P, :]: (c, p, cols)
        reduced = torch.linalg.solve_triangular(factor, columns, upper=False)
        inverse = spectrum @ model.basis.square().T - reduced.square().sum(dim=1)
        diagonal[rows] = torch.where(pruned, 1.0, inverse)


def _refined_solve(coupling, a_bar, model, rows, keep) -> torch.Tensor | None:
    """(H_KK)⁻¹ (coupling)_K per row, placed in (c, cols) float64, from float32 factors (`_refined`); None where
    float32 cannot serve (the caller solves in float64)."""
    index, real, factor = _kept_factor(a_bar, model, rows, keep, dtype=torch.float32)
    if factor is None:
        return None

    def placed(x):
        return torch.zeros_like(coupling).scatter_add(1, index, torch.where(real, x, 0.0))

    def apply(x):  # H_KK x in float64, through the whole Ā
        return torch.gather(placed(x) @ a_bar, 1, index) * model.row_weight[rows, None] + model.damping * x

    x = _refined(torch.where(real, torch.gather(coupling, 1, index), 0.0), real, factor, apply)
    return None if x is None else placed(x)


def _refined(rhs, real, factor, apply) -> torch.Tensor | None:
    """M⁻¹ rhs per row in float64 from float32 Cholesky factors of M (half the time and memory traffic of float64
    ones, which are most of a layer's time): iterative refinement, residuals rhs − M x from `apply` in float64,
    corrections through the factors, until the residual is below `_REFINED_RESIDUAL` × the row's largest |rhs|.
    None where `_REFINEMENTS` steps do not get there (M's condition number near 1 / float32's epsilon)."""
    scale = rhs.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(rhs.dtype).tiny)
    x, residual = torch.zeros_like(rhs), rhs
    for _ in range(_REFINEMENTS):
        x += _cholesky_solve(residual.float(), factor).double()
        residual = torch.where(real, rhs - apply(x), 0.0)
        if bool((residual.abs() <= _REFINED_RESIDUAL * scale).all()):
            return x
    return None


def _kept_factor(
    a_bar: torch.Tensor, model: RowModel, rows: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cholesky factors of G_ii Ā_KK + γI for a chunk of rows, padded to the largest |K_i| with the identity.

    Returns (index, real, factor): kept column indices (c, k) (padding points at column 0, switched off by `real`),
    bool (c, k), and (c, k, k) lower factors in `dtype`; float32 ones are None where rounding made a matrix
    indefinite (float64 ones get a jitter instead).
    """
    counts = keep.sum(dim=1, keepdim=True)
    width = int(counts.max())
    index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    real = torch.arange(width, device=keep.device)[None, :] < counts
    index = torch.where(real, index, 0)
    # Ā_KK by one flat gather from Ā with a zero row and column appended, where the padding points (the gather and
    # the Cholesky are most of a chunk's time; masking afterwards would add three passes over (c, k, k))
    cols = a_bar.shape[0]
    padded = torch.where(real, index, cols)
    system = torch.take(
        torch.nn.functional.pad(a_bar.to(dtype), (0, 1, 0, 1)), padded[:, :, None] * (cols + 1) + padded[:, None, :]
    )
    system.mul_(model.row_weight[rows, None, None].to(dtype))
    system.diagonal(dim1=-2, dim2=-1).add_(torch.where(real, model.damping, 1.0).to(dtype))  # γI; identity on padding
    if dtype == torch.float64:
        return index, real, _cholesky(system)
    return index, real, _factor_32(system)


def _pruned_inverse(basis_p: torch.Tensor, spectrum: torch.Tensor, real: torch.Tensor, dtype: torch.dtype):
    """H⁻¹_PP = [U diag(1/(G_ii λ + γ)) Uᵀ]_PP per row in `dtype` from U's rows at the pruned columns (c, p, cols),
    with the identity on the padding (`real` False)."""
    basis = basis_p.to(dtype)
    system = (basis * spectrum.to(dtype)[:, None, :]) @ basis.transpose(1, 2)
    system.diagonal(dim1=-2, dim2=-1).add_((~real).to(dtype))
    return system


def _factor_32(system: torch.Tensor) -> torch.Tensor | None:
    """Lower float32 Cholesky factors of a batch; None where rounding made a matrix indefinite (no jitter: float64
    takes over)."""
    factor, info = torch.linalg.cholesky_ex(system)
    return None if bool((info != 0).any()) else factor


def _cholesky_solve(rhs: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(LLᵀ)⁻¹ b for a batch: (c, k) right-hand sides, (c, k, k) lower factors. Two triangular solves: on CPU
    `torch.cholesky_solve` first copies the factor's lower triangle, ~8× the solves' time at k ~ 1,000."""
    y = torch.linalg.solve_triangular(factor, rhs.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(factor.mT, y, upper=True).squeeze(-1)


def _cholesky(system: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch of matrices positive definite in exact arithmetic (G_ii Ā_KK + γI, or
    H⁻¹_PP); a relative jitter rescues the ones rounding made indefinite."""
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info != 0).any()):
        scale = system.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
        eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
        factor = torch.linalg.cholesky(system + 1e-10 * scale * eye)
    return factor


def sweep_compensation(
    weight: torch.Tensor,
    model: RowModel,
    pruned: torch.Tensor,
    *,
    fixed: torch.Tensor | None = None,
    group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """δW by sequential OBS in column order, every row with the shared H = Ā + λI (SparseGPT's sweep): O(cols³ +
    rows · cols²) per layer instead of the exact rule's rows · |K|³.

    Row i's Hessian is taken as G_ii (Ā + λI), λ = γ / mean_i G_ii (the exact model's damping at the mean row): the
    scalar G_ii does not change a row's OBS update, so all rows share one upper Cholesky factor U of H⁻¹ = UᵀU.
    Column j's pruned weights are removed with the update −(w_ij / U_jj) U_j,: on the columns after j (earlier columns
    are final), so a pruned weight's error reaches only later kept weights; equal to the exact joint update where a
    row's kept weights all come after its pruned ones. Updates of later columns are applied per block of
    `_SWEEP_BLOCK` columns (lazy batches). A column scale (learned Kronecker Q) is solved in scaled coordinates.

    Args:
        pruned: bool (rows, cols), the pruned set the selection chose. With `fixed` None it is used as given.
        fixed: bool (rows, cols), weights that must stay pruned (pruned before this step). Given, only `pruned`'s
            counts are kept: each block of columns (each row's group of `group` columns for N:M) prunes as many weights
            as `pruned` has there, `fixed` first, the others chosen when the sweep reaches the block by
            ρ = G_ii w² / (2 U_jj²) on the weights as the earlier blocks left them (SparseGPT's adaptive mask), ties
            by row-major order (c_i = G_ii + γ / mean diag(Ā + λI) in place of G_ii, so that rows the Fisher barely
            sees are ranked by the damping, as in the exact rule).
        group: M of an N:M pattern (blocks of the sweep are whole groups).

    Returns:
        (δW, pruned mask used): float64 (rows, cols) with (W + δW) exactly 0 on the mask, and the bool mask.
    """
    scale = model.column_scale
    w = weight.double() if scale is None else weight.double() / scale
    rows, cols = w.shape
    mean_weight = model.mean_row_weight()
    lam = model.damping / mean_weight if mean_weight > 0 else model.damping
    eigenvalues = model.eigenvalues + lam
    if not bool((eigenvalues > 0).all()):
        raise ValueError("sweep_compensation: Ā + λI is singular (λ = 0 and a zero eigenvalue of Ā)")
    upper = torch.linalg.cholesky((model.basis / eigenvalues) @ model.basis.T, upper=True)
    # the adaptive mask ranks row i as c_i (Ā + λI) with c_i = G_ii + γ / mean diag(Ā + λI): a row the Fisher barely
    # sees keeps the damping's γ w² / 2 instead of looking free (which once put half an output layer among the pruned)
    row_scale = model.row_weight + model.damping / float(eigenvalues.mean())
    width = _SWEEP_BLOCK if group is None else max(1, _SWEEP_BLOCK // group) * group
    new, used = w.clone(), pruned.to(torch.bool).clone()
    for start in range(0, cols, width):
        end = min(start + width, cols)
        block, u_block = new[:, start:end], upper[start:end, start:end]
        if fixed is not None:
            score = row_scale[:, None] * block.square() / (2 * u_block.diagonal().square())[None, :]
            used[:, start:end] = _adaptive_mask(score, used[:, start:end], fixed[:, start:end], group)
        errors = torch.zeros(rows, end - start, dtype=w.dtype, device=w.device)
        for j in range(end - start):
            error = torch.where(used[:, start + j], block[:, j], 0.0) / u_block[j, j]
            block[:, j:] -= error[:, None] * u_block[j, j:][None, :]
            errors[:, j] = error
        new[:, end:] -= errors @ upper[start:end, end:]
    return _scaled_back(new - w, scale, weight, used), used


def _scaled_back(delta: torch.Tensor, scale: torch.Tensor | None, weight: torch.Tensor, pruned: torch.Tensor):
    """δW from a solve in the coordinates W ⊘ S (S None: the identity), with (W + δW) exactly 0 on `pruned`."""
    delta = delta if scale is None else delta * scale
    return delta.masked_scatter_(pruned, -weight.double()[pruned])


def _adaptive_mask(score: torch.Tensor, chosen: torch.Tensor, fixed: torch.Tensor, group: int | None) -> torch.Tensor:
    """Per cell (the block, or each row's group of `group` columns), as many pruned as `chosen` has there: `fixed`
    first, then the lowest scores, ties by row-major order."""
    rows, width = score.shape
    cells = (1, rows * width) if group is None else (rows * width // group, group)
    score = score.masked_fill(fixed.to(torch.bool), float("-inf")).reshape(cells)
    quota = chosen.reshape(cells).sum(dim=1, keepdim=True)
    rank = torch.argsort(torch.argsort(score, dim=1, stable=True), dim=1)  # each entry's place in its cell's order
    return (rank < quota).reshape(rows, width)

"""Parametric forms of one layer's Q(λ) ≈ (F + γI)⁻¹, learned by the FishLeg auxiliary loss.

Every structure acts on the layer's matrix view V of shape (rows, width) — width is `cols`, plus one
bias column for structures that model the bias — and is PSD by construction:

- `KroneckerQ`:  Q(V) = A ⊙ (RᵀR (A ⊙ V) LLᵀ), i.e. Q = D_A (RᵀR ⊗ LLᵀ) D_A in row-major vec form,
  A = exp(a) > 0; R, L optionally block-diagonal (blocks of `factor_block_size`) to bound memory.
  diag Q_(i,j) = A_ij² ‖R_{:,i}‖² ‖L_{j,:}‖².
- `BlockDiagonalQ`: Q restricted to blocks of B consecutive weights of a row,
  Q_b = S_b C_b C_bᵀ S_b with S_b = diag(exp(s_b)) (scale, learned in log space so Adam steps are
  relative) and C_b (B × B) initialised to the identity.
- `DiagonalQ`: Q = diag(exp(2s)).

`init_diagonal(d)` sets Q = diag(d) (d > 0), e.g. d = 1/γ (FLS ≡ magnitude pruning before any aux
step) or d = 1/(E[g²] + γ) (≡ OBD); `init_blocks` (block_diagonal, diagonal) starts from row blocks of a
per-example-gradient Fisher inverse (≡ oBERT's, from the true Fisher).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...model.blocks import from_row_blocks, regroup_row_blocks, row_blocks
from ..base import RowModel


def _pad_to(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    pad = size - x.shape[dim]
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - dim - 1) + [0, pad]
    return nn.functional.pad(x, widths)


def _diagonal_blocks(square: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """The `count` consecutive (size × size) blocks on the diagonal of `square`, zero-padded: (count, size, size)."""
    padded = _pad_to(_pad_to(square, count * size, 0), count * size, 1)
    return torch.stack([padded[b * size : (b + 1) * size, b * size : (b + 1) * size] for b in range(count)])


class BlockFactor(nn.Module):
    """A (n × n) matrix stored as block-diagonal (nb, k, k); k = n gives a full matrix."""

    def __init__(self, n: int, block: int | None) -> None:
        super().__init__()
        self.n = n
        self.k = min(block or n, n)
        self.nb = -(-n // self.k)
        self.weight = nn.Parameter(torch.eye(self.k).repeat(self.nb, 1, 1))
        # Entries of the last block that fall past n would couple real and padded coordinates.
        valid = (torch.arange(self.nb * self.k) < n).float().reshape(self.nb, self.k)
        self.register_buffer("valid", valid[:, :, None] * valid[:, None, :], persistent=False)

    def matrix_blocks(self) -> torch.Tensor:
        return self.weight * self.valid

    def left(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """F·x (or Fᵀ·x) for x: (n, c)."""
        f = self.matrix_blocks().transpose(1, 2) if transpose else self.matrix_blocks()
        xb = _pad_to(x, self.nb * self.k, 0).reshape(self.nb, self.k, -1)
        return torch.bmm(f, xb).reshape(self.nb * self.k, -1)[: self.n]

    def right(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x·F (or x·Fᵀ) for x: (r, n)."""
        f = self.matrix_blocks().transpose(1, 2) if transpose else self.matrix_blocks()
        xb = _pad_to(x, self.nb * self.k, 1).reshape(x.shape[0], self.nb, self.k)
        return torch.einsum("rbk,bkl->rbl", xb, f).reshape(x.shape[0], -1)[:, : self.n]

    def column_sq_norms(self) -> torch.Tensor:
        """‖F_{:,i}‖² for every column i: (n,)."""
        return self.matrix_blocks().pow(2).sum(1).reshape(-1)[: self.n]

    def row_sq_norms(self) -> torch.Tensor:
        """‖F_{j,:}‖² for every row j: (n,)."""
        return self.matrix_blocks().pow(2).sum(2).reshape(-1)[: self.n]


def _inverse_gram(factor: BlockFactor, *, transpose: bool) -> torch.Tensor:
    """Blocks of (FᵀF)⁻¹ (`transpose`) or (FFᵀ)⁻¹ in float64: (nb, k, k); padded coordinates get 1 (never read)."""
    f = factor.matrix_blocks().double()
    gram = f.transpose(1, 2) @ f if transpose else f @ f.transpose(1, 2)
    padding = 1.0 - factor.valid.diagonal(dim1=1, dim2=2).double()
    return torch.linalg.inv(gram + torch.diag_embed(padding))


class KroneckerQ(nn.Module):
    """Q(V) = A ⊙ (RᵀR (A ⊙ V) LLᵀ) on (rows, width) matrices."""

    def __init__(self, rows: int, width: int, damping: float, factor_block_size: int | None = None) -> None:
        super().__init__()
        self.shape = (rows, width)
        self.R = BlockFactor(rows, factor_block_size)
        self.L = BlockFactor(width, factor_block_size)
        self.log_a = nn.Parameter(torch.full((rows, width), -0.5 * math.log(damping)))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        a = self.log_a.exp()
        x = self.R.left(self.R.left(a * v), transpose=True)  # RᵀR (A⊙V)
        x = self.L.right(self.L.right(x), transpose=True)  # (...) L Lᵀ
        return a * x

    def diag(self) -> torch.Tensor:
        a2 = (2 * self.log_a).exp()
        return a2 * torch.outer(self.R.column_sq_norms(), self.L.row_sq_norms())

    def row_block_entries(self, block_size: int, cols: int) -> torch.Tensor:
        """Within-row blocks over the first `cols` columns: (rows · ceil(cols/B), B, B).

        Entry formula Q_(i,j),(i,k) = A_ij A_ik (RᵀR)_ii (LLᵀ)_jk — Q itself is never formed.
        """
        rows = self.shape[0]
        nbc = -(-cols // block_size)
        width = self.shape[1]
        l_dense = torch.block_diag(*self.L.matrix_blocks())[:width, :width]
        g = _diagonal_blocks((l_dense @ l_dense.T)[:cols, :cols], block_size, nbc)
        a = _pad_to(self.log_a.exp()[:, :cols], nbc * block_size, 1).reshape(rows, nbc, block_size)
        rr = self.R.column_sq_norms()
        out = rr[:, None, None, None] * a[..., :, None] * a[..., None, :] * g[None]
        return out.reshape(rows * nbc, block_size, block_size)

    @torch.no_grad()
    def row_model(self, cols: int) -> RowModel:
        """Q⁻¹'s within-row blocks over the first `cols` columns, as a `RowModel` for row-wise OBC.

        Q = S (RᵀR ⊗ LLᵀ) S with S = diag(A), so Q⁻¹ = S⁻¹ ((RᵀR)⁻¹ ⊗ (LLᵀ)⁻¹) S⁻¹ and row i's block is
        S_i⁻¹ [(RᵀR)⁻¹]_ii (LLᵀ)⁻¹ S_i⁻¹: Ā = (LLᵀ)⁻¹ restricted to the weight columns (a bias column stays fixed, as
        the K-FAC row model holds it), G_ii = [(RᵀR)⁻¹]_ii (the Fisher's diagonal, not 1/[RᵀR]_ii), γ = 0 (Q's
        factors hold the damping they learned).
        """
        row_weight = _inverse_gram(self.R, transpose=True).diagonal(dim1=1, dim2=2).reshape(-1)[: self.shape[0]]
        a_bar = torch.block_diag(*_inverse_gram(self.L, transpose=False))[:cols, :cols]
        lam, basis = torch.linalg.eigh(a_bar)
        return RowModel(basis, lam.clamp_min(0), row_weight, 0.0, self.log_a[:, :cols].double().exp())

    @torch.no_grad()
    def init_diagonal(self, d: torch.Tensor) -> None:
        for factor in (self.R, self.L):
            factor.weight.copy_(torch.eye(factor.k).repeat(factor.nb, 1, 1))
        self.log_a.copy_(0.5 * d.log())

    @torch.no_grad()
    def init_kfac(self, a_bar: torch.Tensor, g: torch.Tensor, damping: float) -> None:
        """K-FAC inverse with factored damping: RᵀR = (G + π√γ I)⁻¹, LLᵀ = (Ā + √γ/π I)⁻¹, A = 1."""
        width = self.shape[1]
        a_bar = a_bar[:width, :width]
        pi = math.sqrt(float(torch.diagonal(a_bar).mean() / g.mean().clamp_min(1e-30)))
        r_diag = (g + pi * math.sqrt(damping)).rsqrt()
        r_full = _pad_to(r_diag, self.R.nb * self.R.k, 0).reshape(self.R.nb, self.R.k)
        self.R.weight.copy_(torch.diag_embed(r_full))
        blocks = _diagonal_blocks(a_bar, self.L.k, self.L.nb)
        # L = U (Λ + √γ/π)^-½ gives LLᵀ = (Ā + √γ/π I)⁻¹ without a Cholesky of an ill-conditioned inverse.
        lam, vecs = torch.linalg.eigh(blocks.double())
        self.L.weight.copy_((vecs * (lam.clamp_min(0) + math.sqrt(damping) / pi).rsqrt()[:, None, :]).float())
        self.log_a.zero_()


class BlockDiagonalQ(nn.Module):
    """Q_b = S_b C_b C_bᵀ S_b over blocks of `block_size` consecutive weights of a row."""

    def __init__(self, rows: int, width: int, damping: float, block_size: int) -> None:
        super().__init__()
        self.shape = (rows, width)
        self.block_size = block_size
        nblocks = rows * -(-width // block_size)
        self.log_s = nn.Parameter(torch.full((nblocks, block_size), -0.5 * math.log(damping)))
        self.C = nn.Parameter(torch.eye(block_size).repeat(nblocks, 1, 1))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        s = self.log_s.exp()
        x = s * row_blocks(v, self.block_size)
        x = torch.bmm(self.C, torch.bmm(self.C.transpose(1, 2), x.unsqueeze(-1))).squeeze(-1)
        return from_row_blocks(s * x, self.shape)

    def diag(self) -> torch.Tensor:
        d = (2 * self.log_s).exp() * self.C.pow(2).sum(2)
        return from_row_blocks(d, self.shape)

    def dense_blocks(self) -> torch.Tensor:
        """(nblocks, B, B) blocks S C Cᵀ S (padded coordinates included; callers mask them)."""
        s = self.log_s.exp()
        return s[:, :, None] * torch.bmm(self.C, self.C.transpose(1, 2)) * s[:, None, :]

    def row_block_entries(self, block_size: int, cols: int) -> torch.Tensor:
        """Within-row blocks of another size B': entries gathered from the learned blocks (0 across them)."""
        dense = self.dense_blocks()
        if block_size == self.block_size:
            return dense
        return regroup_row_blocks(dense, (self.shape[0], cols), block_size)

    @torch.no_grad()
    def init_kfac(self, a_bar: torch.Tensor, g: torch.Tensor, damping: float) -> None:
        """Q_b = (G_ii Ā_JJ + γI)⁻¹: the K-FAC Fisher's within-row blocks, inverted exactly."""
        self._set_factor(_kfac_blocks_inverse_sqrt(a_bar, g, damping, self.shape[1], self.block_size))

    @torch.no_grad()
    def init_blocks(self, blocks: torch.Tensor) -> None:
        """Q_b = the given PD blocks (nblocks, B, B) in this structure's row-block layout."""
        self._set_factor(torch.linalg.cholesky(blocks.double()).float())

    def _set_factor(self, c: torch.Tensor) -> None:
        """Q_b = c cᵀ stored scale-free: S = √diag(c cᵀ) and C = S⁻¹c (unit-norm rows), so that Adam's
        absolute steps on C are relative changes of Q whatever the Fisher's scale (raw C entries ~ γ^-½)."""
        norms = c.pow(2).sum(-1).clamp_min(1e-30)
        self.C.copy_(c * norms.rsqrt()[..., None])
        self.log_s.copy_(0.5 * norms.log())

    @torch.no_grad()
    def init_diagonal(self, d: torch.Tensor) -> None:
        self.C.copy_(torch.eye(self.block_size).repeat(self.C.shape[0], 1, 1))
        blocks = row_blocks(d, self.block_size)
        self.log_s.copy_(torch.where(blocks > 0, 0.5 * blocks.clamp_min(1e-30).log(), self.log_s))


def _kfac_blocks_inverse_sqrt(
    a_bar: torch.Tensor, g: torch.Tensor, damping: float, cols: int, block_size: int
) -> torch.Tensor:
    """C with C Cᵀ = (g_i Ā_JJ + γI)⁻¹ for every row i and block J of `block_size` columns: (rows·nbc, B, B)."""
    nbc = -(-cols // block_size)
    blocks = _diagonal_blocks(a_bar[:cols, :cols], block_size, nbc).double()
    lam, vecs = torch.linalg.eigh(blocks)  # Ā_J = U Λ Uᵀ, so (g Ā_J + γ)⁻¹ = U (gΛ + γ)⁻¹ Uᵀ
    inv_sqrt = (g.double()[:, None, None] * lam.clamp_min(0)[None] + damping).rsqrt()  # (rows, nbc, B)
    c = vecs[None] * inv_sqrt[:, :, None, :]
    return c.reshape(-1, block_size, block_size).float()


class DiagonalQ(nn.Module):
    """Q = diag(exp(2s))."""

    def __init__(self, rows: int, width: int, damping: float) -> None:
        super().__init__()
        self.shape = (rows, width)
        self.log_s = nn.Parameter(torch.full((rows, width), -0.5 * math.log(damping)))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return (2 * self.log_s).exp() * v

    def diag(self) -> torch.Tensor:
        return (2 * self.log_s).exp()

    def row_block_entries(self, block_size: int, cols: int) -> torch.Tensor:
        return torch.diag_embed(row_blocks(self.diag()[:, :cols], block_size))

    @torch.no_grad()
    def init_diagonal(self, d: torch.Tensor) -> None:
        self.log_s.copy_(0.5 * d.log())

    @torch.no_grad()
    def init_blocks(self, blocks: torch.Tensor) -> None:
        """Q = the diagonal of the given row blocks (nblocks, B, B), padding dropped."""
        self.init_diagonal(from_row_blocks(blocks.diagonal(dim1=-2, dim2=-1), self.shape))

    @torch.no_grad()
    def init_kfac(self, a_bar: torch.Tensor, g: torch.Tensor, damping: float) -> None:
        """Q = diag 1/(G_ii Ā_jj + γ): the K-FAC Fisher diagonal (OBD with Kronecker statistics)."""
        width = self.shape[1]
        self.init_diagonal(1.0 / (torch.outer(g, torch.diagonal(a_bar)[:width]) + damping))


STRUCTURES = ("block_diagonal", "kronecker", "diagonal")


def structure_numel(structure: str, rows: int, width: int, *, block_size: int, factor_block_size: int | None) -> int:
    """Number of learned values a structure holds (for the memory estimate made before allocating)."""
    if structure == "kronecker":

        def factor(n: int) -> int:
            k = min(factor_block_size or n, n)
            return -(-n // k) * k * k

        return factor(rows) + factor(width) + rows * width
    if structure == "block_diagonal":
        nblocks = rows * -(-width // block_size)
        return nblocks * (block_size * block_size + block_size)
    return rows * width


def build_structure(
    structure: str, rows: int, width: int, damping: float, *, block_size: int, factor_block_size: int | None
) -> nn.Module:
    if structure == "kronecker":
        return KroneckerQ(rows, width, damping, factor_block_size)
    if structure == "block_diagonal":
        return BlockDiagonalQ(rows, width, damping, block_size)
    return DiagonalQ(rows, width, damping)

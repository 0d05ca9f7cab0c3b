"""Optimal Brain Surgeon with any `CurvatureProvider`: saliency, compensation, one pruning step.

With Q ≈ (F + γI)⁻¹ over one layer's weights (the (rows, cols) matrix view of its adapter):

- saliency of weight q: ρ_q = w_q² / (2 Q_qq) (`obs`), the loss increase of removing q alone and letting
  the others move optimally under the quadratic model; or ρ_q = ½ w_q² [Q_b⁻¹]_qq (`obd`), the increase
  if the others stay put, with the Fisher diagonal read off Q's row blocks (for a diagonal Q both agree;
  for a K-FAC-started block Q it is the Kronecker Fisher diagonal G_ii Ā_jj + γ);
- independent compensation for a pruned set P (one Q·v product): δW = −Q(1_P ⊙ W / diag Q), exact
  for a single weight, an approximation that ignores interactions inside P otherwise;
- joint block compensation (oBERT-style, blocks of B consecutive weights of a row):
  δw = −Q[:, P] (Q_PP)⁻¹ w_P, exact OBS inside each block, with Q treated as block-diagonal.

Pure tensor maths: no transformers imports here. New weights are computed on a copy, pruned
coordinates are set to exactly 0, and the result is checked with `isfinite` before it is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping

import torch

from ..curvature.base import CurvatureProvider, RowModel
from ..distributed import ShardCounts, summed
from ..errors import CurvatureError
from ..model.adapters import LayerAdapter
from ..model.blocks import from_row_blocks, row_blocks
from .conjugate_gradient import CG_TOLERANCE
from .masks import MaskSet
from .obc import obc_saliency, obc_solve, sweep_compensation
from .patterns import MaskPattern, parse_mask_type, select_pruned
from .schedule import recomputation_targets

DIAG_FLOOR = 1e-12  # diag Q is positive by contract; the floor only keeps 1 / diag Q finite
_JITTERS = (1e-8, 1e-6, 1e-4, 1e-2)  # relative to the block's mean pruned diagonal, tried in order


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays; half precisions are promoted so the OBS maths runs in at least fp32."""
    return dtype if dtype == torch.float64 else torch.float32


def _floored(diag_q: torch.Tensor) -> torch.Tensor:
    return diag_q.to(_compute_dtype(diag_q.dtype)).clamp_min(DIAG_FLOOR)


def obs_saliency(weight: torch.Tensor, diag_q: torch.Tensor) -> torch.Tensor:
    """ρ = W² / (2 · diag Q), elementwise.

    Args:
        weight: (rows, cols) W.
        diag_q: (rows, cols) diag Q (floored at `DIAG_FLOOR`).

    Returns:
        (rows, cols) finite, non-negative saliencies (overflow and NaN map to the dtype's max, i.e.
        "never prune first").
    """
    diag = _floored(diag_q)  # a fresh tensor: doubled in place
    saliency = weight.to(diag.dtype).square().div_(diag.mul_(2))
    largest = torch.finfo(diag.dtype).max
    return saliency.nan_to_num_(nan=largest, posinf=largest)


def obd_saliency(weight: torch.Tensor, q_blocks: torch.Tensor) -> torch.Tensor:
    """ρ = ½ W² · diag(Q_b⁻¹) per row block (`q_blocks` as `provider.blocks(name, B)`, padding zeroed).

    Blocks whose Cholesky fails fall back to 1 / diag Q (the OBS saliency) for their weights.
    """
    q = q_blocks.double()
    diag = q.diagonal(dim1=-2, dim2=-1)
    padded = diag == 0  # padding (and only padding) has a zero diagonal: Q is positive definite
    factor, info = torch.linalg.cholesky_ex(q + torch.diag_embed(padded.double()))
    inverse_diag = torch.cholesky_inverse(factor).diagonal(dim1=-2, dim2=-1)
    fallback = (info != 0)[:, None] | ~torch.isfinite(inverse_diag)
    inverse_diag = torch.where(fallback, 1.0 / diag.clamp_min(DIAG_FLOOR), inverse_diag)
    fisher_diag = from_row_blocks(inverse_diag, tuple(weight.shape)).to(_compute_dtype(weight.dtype))
    return obs_saliency(weight, 1.0 / fisher_diag)


def independent_compensation(
    provider: CurvatureProvider, name: str, weight: torch.Tensor, prune: torch.Tensor
) -> torch.Tensor:
    """δW = −Q(1_P ⊙ W / diag Q) for layer `name`, in one matvec.

    Args:
        weight: (rows, cols) W.
        prune: bool (rows, cols), True on the newly pruned set P.

    Returns:
        (rows, cols) δW in the provider's dtype. (W + δW)_P = 0 only when P is a single weight;
        `prune_step` zeroes P exactly afterwards.
    """
    diag = _floored(provider.diag(name))
    scaled = torch.where(prune, weight.to(diag.dtype) / diag, 0.0)
    return -provider.matvec(name, scaled)


def joint_block_compensation(
    weight: torch.Tensor, q_blocks: torch.Tensor, prune: torch.Tensor, block_size: int
) -> torch.Tensor:
    """OBS joint update inside blocks of `block_size` consecutive weights of a row.

    Per block b with pruned set P: δw_b = −Q_b[:, P] (Q_PP)⁻¹ w_P. All blocks are solved in one
    batched Cholesky solve of M x = 1_P ⊙ w, with M = Q_PP on pruned coordinates and the identity
    elsewhere (so x_P = (Q_PP)⁻¹ w_P and x = 0 off P); then δ_b = −Q_b x. Blocks without pruned
    weights give δ = 0 and are not solved.

    Args:
        weight: (rows, cols) W.
        q_blocks: (rows · ceil(cols / B), B, B) dense blocks of Q (`provider.blocks(name, B)`).
        prune: bool (rows, cols), True on the newly pruned set.
        block_size: B.

    Returns:
        (rows, cols) δW in `q_blocks`' dtype.
    """
    w = row_blocks(weight.to(q_blocks.dtype), block_size)
    p = row_blocks(prune.to(q_blocks.dtype), block_size).to(torch.bool)
    delta = torch.zeros_like(w)
    active = p.any(dim=1)
    if active.any():
        q, pa = q_blocks[active], p[active]
        eye = torch.eye(block_size, dtype=q.dtype, device=q.device)
        m = torch.where(pa[:, :, None] & pa[:, None, :], q, eye)
        x = _solve_pd(m, torch.where(pa, w[active], 0.0), pa)
        delta[active] = -(q @ x.unsqueeze(-1)).squeeze(-1)
    return from_row_blocks(delta, tuple(weight.shape))


def _solve_pd(m: torch.Tensor, rhs: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """x = M⁻¹ rhs for a batch of SPD M (nblocks, B, B), rhs (nblocks, B).

    Cholesky rather than LU: M should be positive definite, and `cholesky_ex` flags the blocks
    where it numerically is not; only those are retried with a growing relative jitter on the
    pruned diagonal.
    """
    factor, info = torch.linalg.cholesky_ex(m)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    for jitter in _JITTERS:
        bad = (info != 0) | ~torch.isfinite(x).all(dim=-1)
        if not bad.any():
            break
        pb = pruned[bad].to(m.dtype)
        scale = (m[bad].diagonal(dim1=-2, dim2=-1).abs() * pb).sum(-1) / pb.sum(-1)
        shifted = m[bad] + torch.diag_embed(jitter * scale.clamp_min(DIAG_FLOOR)[:, None] * pb)
        factor, info_bad = torch.linalg.cholesky_ex(shifted)
        x[bad] = torch.cholesky_solve(rhs[bad].unsqueeze(-1), factor).squeeze(-1)
        info[bad] = info_bad
    return x


def rule_mismatch(coupled_block: int | None, saliency: str, compensation: str) -> str | None:
    """Why a saliency / compensation pair does not fit a Q that couples weights within `coupled_block` (1: diagonal,
    None: across blocks), with the pair to use instead; None when it fits (measured: DESIGN.md §2, issue 17)."""
    if compensation == "obc" or coupled_block == 1:
        return None  # OBC ranks by its own row model; with a diagonal Q every rule here is OBS = OBD
    if compensation == "none" and saliency == "obs":
        return (
            "`pruning.saliency: obs` ranks a weight by the loss after the OBS compensation, which "
            "`pruning.compensation: none` never applies: use `pruning.saliency: obd` (the loss of zeroing it alone)"
        )
    if compensation == "independent":
        return (
            "`pruning.compensation: independent` ignores the interactions among the pruned weights that this Q holds: "
            "use `block`, or `pruning.method: kfac` with `pruning.compensation: obc`"
        )
    if compensation == "block" and coupled_block is None:
        return (
            "`pruning.compensation: block` solves OBS inside blocks of a Q that couples across them (blocks of the "
            "inverse are not inverses of the blocks) and drops every movement outside the block: use "
            "`pruning.method: kfac` with `pruning.compensation: obc`"
        )
    return None


def prune_step(
    provider: CurvatureProvider,
    layers: Mapping[str, LayerAdapter],
    masks: MaskSet,
    target: float,
    pattern: MaskPattern | str,
    *,
    global_scope: bool = True,
    compensation: str = "block",
    block_size: int = 50,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    saliency: str = "obs",
    obc_rounds: int = 1,
    obc_solver: str = "exact",
    shards: ShardCounts | None = None,
) -> dict[str, dict[str, float | int]]:
    """Prune every layer to `target` (see `select_pruned`) with `saliency` (obs | obd) and compensation
    (block | independent | none | obc: the row-wise OBC of `obc.py`, with its own saliency), as the recipe
    validated them (`recipe.SALIENCIES`, `recipe.COMPENSATIONS`).

    Updates the module weights (in their dtype), `masks` (in place) and the provider's mask (the masks' own
    tensors, `masks.keep_matrix`).

    Memory (issue 18): one saliency per targeted weight (in the compute dtype), made a score in place and freed
    once its layer's new mask is built (`select_pruned(..., in_place=True)`), and the new masks, each freed once
    its layer is written; plus one layer's temporaries. Each layer's diag Q is read once and dropped (OBC keeps
    those of layers with non-finite curvature only). Except with OBC, which solves every layer before writing any,
    layers are compensated and written one at a time: selection errors come before any write, but an error while
    compensating a layer leaves the layers before it written.

    FSDP2 (`shards`): every layer's weight, mask and curvature are this rank's rows; the row-wise rules (magnitude,
    OBS with a diagonal Q, row-wise OBC) work on them as they are, and the selection counts over all ranks.

    Returns:
        module name → {"sparsity": layer sparsity after the step, "pruned_now": weights pruned now}.
    """
    pattern = parse_mask_type(pattern)
    names = sorted(layers)
    old_keep = {n: masks.keep_matrix(n) for n in names}
    weights = {n: layers[n].weight_matrix() for n in names}
    broken: set[str] = set()
    diags: dict[str, torch.Tensor] = {}  # diag Q of the broken layers only
    saliencies: dict[str, torch.Tensor] = {}  # fresh tensors, handed to the selection to become scores in place
    for n in provider.visit(names):
        diag = provider.diag(n)
        if _non_finite_curvature(n, diag):
            broken.add(n)
            diags[n] = diag
        if compensation != "obc":
            saliencies[n] = _saliency(provider, n, weights[n], diag, saliency, block_size, n in broken)
        del diag

    def select(scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], sub_target: float):
        """New keep masks (`select_pruned`), turning the fresh `scores` into scores in place and emptying the dict."""
        return select_pruned(
            scores,
            keep,
            sub_target,
            pattern,
            global_scope=global_scope,
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
            in_place=True,
            shards=shards,
        )

    def updates() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:  # (name, new weight, new keep) per layer
        if compensation == "obc":
            group = pattern.m  # N:M: the sweep chooses inside each group of M (None: unstructured)
            new_weights, new_keep = _obc_rounds(
                weights, old_keep, provider, broken, diags, select, target, obc_rounds, obc_solver, group, shards
            )
            for n in names:
                yield n, new_weights.pop(n), new_keep.pop(n)
            return
        new_keep = select(saliencies, old_keep, target)
        for n in provider.visit(names):
            keep = new_keep.pop(n)
            rule = "none" if n in broken else compensation
            yield n, _compensated(provider, n, weights[n], keep, old_keep[n] & ~keep, rule, block_size), keep

    report: dict[str, dict[str, float | int]] = {}
    for n, new_weight, new_keep in updates():
        pruned_now = int((old_keep[n] & ~new_keep).sum())
        layers[n].write_matrix(new_weight)
        masks.set(n, new_keep)
        provider.mask(n, masks.keep_matrix(n))
        report[n] = {"sparsity": masks.sparsity(n), "pruned_now": pruned_now}
    return report


def _row_model(provider: CurvatureProvider, name: str) -> RowModel:
    """The layer's row model (read during its turn of `provider.visit`)."""
    model = provider.row_model(name)
    if model is None:
        raise CurvatureError(
            f"`pruning.compensation: obc` needs a row-wise curvature model, which {type(provider).__name__} does not "
            f"hold for `{name}`: use `pruning.method: kfac`, or another compensation"
        )
    return model


def _obc_rounds(
    weights: dict[str, torch.Tensor],
    keep: dict[str, torch.Tensor],
    provider: CurvatureProvider,
    broken: set[str],
    diags: Mapping[str, torch.Tensor],
    select,
    target: float,
    rounds: int,
    solver: str = "exact",
    group: int | None = None,
    shards: ShardCounts | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Row-wise OBC in `rounds` sub-steps (equal in log-density, as `recomputation_targets`): each ranks the kept
    weights by ρ = w²/(2 [(H_i)_KK⁻¹]_jj) on the weights as the previous round compensated them, prunes to its
    sub-target and compensates every row jointly; one Cholesky per row and round gives both the update and the next
    round's diagonal. `solver: sweep` ranks by the saliency of the weights as they are (ρ with nothing pruned, the
    pruned ones at zero), which fixes each layer's count and each block's (group's) count, and then
    `sweep_compensation` chooses inside the blocks as it reaches them: one factor per layer, no per-row solve.
    `solver: joint` ranks as the sweep does (one eigenbasis per layer gives every ρ) and compensates every row
    jointly as `exact` does: one Cholesky of the new kept set per row, none for the ranking; `solver: cg` ranks as
    joint and reaches the same update by conjugate gradients where they are cheaper (to a loss within 1e-3 of it).
    Layers with non-finite curvature rank by w²/(2 diag Q) and are only zeroed."""
    total, pruned = summed(shards, [sum(k.numel() for k in keep.values()), sum(int((~k).sum()) for k in keep.values())])
    current = min(target, pruned / total)
    sub_targets = recomputation_targets(current, target, rounds)
    inverse_diag: dict[str, torch.Tensor | None] = dict.fromkeys(weights)
    for i, sub_target in enumerate(sub_targets):
        scores = {}
        for n in provider.visit(list(weights)):
            w = weights[n]
            if n in broken:
                scores[n] = obs_saliency(w, diags[n])
            elif inverse_diag[n] is None:
                scores[n] = obc_saliency(w, _row_model(provider, n), keep[n] if solver == "exact" else None)
            else:
                scores[n] = torch.where(keep[n], w.double().square() / (2 * inverse_diag[n]), 0.0)
        before, keep = keep, select(scores, keep, sub_target)  # empties `scores`
        last = i == len(sub_targets) - 1
        for n in provider.visit(list(weights)):
            w = weights[n]
            if n in broken:
                weights[n] = w.masked_fill(~keep[n], 0)
                continue
            rows = _row_model(provider, n)
            if solver == "sweep":
                delta, pruned = sweep_compensation(w, rows, ~keep[n], fixed=~before[n], group=group)
                keep[n] = ~pruned
            else:
                delta, inverse_diag[n] = obc_solve(
                    w,
                    rows,
                    keep[n],
                    inverse_diag=solver == "exact" and not last,
                    cg_tolerance=CG_TOLERANCE if solver == "cg" else 0.0,
                )
            weights[n] = _checked(n, w, delta, keep[n], "obc")
    return weights, keep


def _saliency(
    provider: CurvatureProvider,
    name: str,
    weight: torch.Tensor,
    diag: torch.Tensor,
    saliency: str,
    block_size: int,
    broken: bool,
) -> torch.Tensor:
    """OBS (w²/2Q_qq), or OBD read off Q's blocks."""
    if broken:
        return obs_saliency(weight, diag)
    if saliency == "obd":
        return obd_saliency(weight, provider.blocks(name, block_size))
    return obs_saliency(weight, diag)


def _non_finite_curvature(name: str, diag: torch.Tensor) -> bool:
    """Whether diag Q of module `name` holds NaN / inf (warned): pruned without compensation, its bad entries last."""
    bad = int((~torch.isfinite(diag)).sum())
    if bad:
        warnings.warn(
            f"module `{name}`: diag Q is not finite at {bad} of {diag.numel()} weights; those count as most "
            "salient (pruned last) and this layer is pruned without compensation (check its curvature estimate "
            "and `curvature.damping`)",
            RuntimeWarning,
            stacklevel=3,
        )
    return bool(bad)


def _compensated(
    provider: CurvatureProvider,
    name: str,
    weight: torch.Tensor,
    keep: torch.Tensor,
    pruned_now: torch.Tensor,
    compensation: str,
    block_size: int,
) -> torch.Tensor:
    """New (rows, cols) weight on a copy: W + δW, then every pruned coordinate set to exactly 0."""
    if compensation == "none" or not pruned_now.any():
        return weight.masked_fill(~keep, 0)
    if compensation == "independent":
        delta = independent_compensation(provider, name, weight, pruned_now)
    else:
        delta = joint_block_compensation(weight, provider.blocks(name, block_size), pruned_now, block_size)
    return _checked(name, weight, delta, keep, compensation)


def _checked(name: str, weight: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor, compensation: str):
    """W + δW with every pruned coordinate exactly 0; plain zeroing (warned) if the update is not finite."""
    plain = weight.masked_fill(~keep, 0)
    dtype = torch.promote_types(_compute_dtype(weight.dtype), delta.dtype)
    new_weight = (weight.to(dtype) + delta.to(dtype)).masked_fill(~keep, 0)
    if not torch.isfinite(new_weight).all():
        warnings.warn(
            f"module `{name}`: {compensation} compensation gave non-finite weights; this layer was pruned by "
            "zeroing only (check its curvature estimate and `curvature.damping`)",
            RuntimeWarning,
            stacklevel=3,
        )
        return plain
    return new_weight

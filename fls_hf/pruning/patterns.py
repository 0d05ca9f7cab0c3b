"""Mask patterns (unstructured, N:M) and the choice of which weights to prune.

Everything works in the adapters' (rows, cols) matrix view. An N:M group is M consecutive weights
along the input dimension (cols) of one row; at most N of them survive.

`select_pruned` turns saliencies into new keep-masks with an exact pruned count: round(target ·
numel) per layer, or over all layers together (global scope). Already-pruned weights stay pruned
and count toward the target; the lowest saliency goes first; ties break by (sorted module name,
row-major index), so every rank computes the same masks from the same saliencies.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import PruningStateError, RecipeError
from ..recipe import parse_mask_type as recipe_mask_type

_EPS = 1e-9  # float slack when turning sparsity fractions into integer counts


@dataclass(frozen=True)
class MaskPattern:
    """Unstructured (`n`, `m` None) or N:M (at most `n` non-zeros per `m` consecutive weights of a row)."""

    n: int | None = None
    m: int | None = None

    @property
    def is_unstructured(self) -> bool:
        return self.m is None

    @property
    def max_target(self) -> float:
        """Highest reachable sparsity: (M − N)/M for N:M; targets must stay below 1 anyway."""
        return 1.0 if self.m is None else (self.m - self.n) / self.m

    def __str__(self) -> str:
        return "unstructured" if self.m is None else f"{self.n}:{self.m}"

    def check_layer(self, name: str, shape: tuple[int, int]) -> None:
        """Raise when module `name` (matrix `shape`) cannot hold this pattern."""
        if self.m is not None and shape[1] % self.m:
            raise RecipeError(
                f"module `{name}` is too small / not divisible for its pattern: its {shape[1]} input columns "
                f"do not split into groups of {self.m} (mask_type {self}); add it to `pruning.ignore`"
            )

    def candidates(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """bool (rows, cols): weights this pattern allows to prune, given scores (lowest pruned first).

        N:M: the (M − N) lowest-scoring weights of each group (stable order, so ties are deterministic).
        """
        if self.m is None:
            return torch.ones_like(scores, dtype=torch.bool)
        self.check_layer(name, tuple(scores.shape))
        groups = scores.reshape(scores.shape[0], -1, self.m)
        rank = torch.argsort(torch.argsort(groups, dim=-1, stable=True), dim=-1)
        return (rank < self.m - self.n).reshape(scores.shape)


def parse_mask_type(value: str | MaskPattern) -> MaskPattern:
    """`"unstructured"` or `"N:M"` (the recipe's grammar, `recipe.parse_mask_type`) → MaskPattern; a MaskPattern
    is returned unchanged."""
    if isinstance(value, MaskPattern):
        return value
    n_of_m = recipe_mask_type(value)
    return MaskPattern() if n_of_m is None else MaskPattern(*n_of_m)


def select_pruned(
    saliency: Mapping[str, torch.Tensor],
    keep: Mapping[str, torch.Tensor],
    target: float,
    pattern: MaskPattern | str,
    *,
    global_scope: bool,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
) -> dict[str, torch.Tensor]:
    """New keep-masks with exactly round(target · numel) pruned weights.

    Args:
        saliency: module name → (rows, cols) loss increase of removing each weight.
        keep: module name → bool (rows, cols) current masks; False entries stay pruned.
        target: sparsity in [0, 1), at most the pattern's (M − N)/M.
        pattern: `MaskPattern` or a `pruning.mask_type` string.
        global_scope: count over all layers together (True) or in every layer (False).
        min_sparsity, max_sparsity: per-layer bounds honoured by the global allocation, to the
            nearest whole weight (floor of min · numel, ceil of max · numel). The lower bound is
            capped at `target`, so the low early targets of a gradual schedule stay feasible.
            Per-layer scope prunes every layer to `target` itself.

    Returns:
        module name → new bool (rows, cols) keep mask (fresh tensors; the inputs are not modified).
    """
    pattern = parse_mask_type(pattern)
    _check_fraction("pruning target sparsity", target, pattern)
    if set(saliency) != set(keep):
        raise PruningStateError(f"saliency and masks cover different modules: {sorted(set(saliency) ^ set(keep))[:5]}")
    names = sorted(saliency)
    if not names:
        return {}
    scores = {n: _scores(saliency[n], keep[n]) for n in names}
    eligible = {n: pattern.candidates(n, scores[n]) | ~keep[n].to(torch.bool) for n in names}
    if global_scope:
        counts = _global_counts(scores, eligible, keep, target, min_sparsity, max_sparsity)
    else:
        counts = {n: _layer_count(n, eligible[n], keep[n], target) for n in names}
    return {n: _keep_all_but_lowest(scores[n], eligible[n], counts[n]) for n in names}


def _check_fraction(what: str, target: float, pattern: MaskPattern) -> None:
    if not 0.0 <= target < 1.0:
        raise RecipeError(f"{what} = {target!r} must be in [0, 1)")
    if target > pattern.max_target + _EPS:
        raise RecipeError(
            f"{what} = {target!r} exceeds {pattern.max_target:g}, the most mask_type {pattern} can prune ((M − N)/M)"
        )


def _scores(saliency: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Pruned weights → −inf (they stay pruned, counted first); NaN → +inf (never chosen first)."""
    scores = torch.where(torch.isnan(saliency), torch.inf, saliency)
    return scores.masked_fill(~keep.to(torch.bool), -torch.inf)


def _round(x: float) -> int:
    """Round half up: a deterministic count, unlike Python's banker's rounding."""
    return math.floor(x + 0.5)


def _layer_count(name: str, eligible: torch.Tensor, keep: torch.Tensor, target: float) -> int:
    count = _round(target * keep.numel())
    already = int((~keep.to(torch.bool)).sum())
    if count < already:
        raise RecipeError(
            f"module `{name}` already has {already} pruned weights, more than target {target!r} allows ({count}); "
            "pruned weights never regrow, so targets must not decrease"
        )
    if count > int(eligible.sum()):
        raise RecipeError(f"module `{name}` cannot reach target {target!r}: its mask pattern leaves too few candidates")
    return count


def _layer_bounds(
    name: str, eligible: torch.Tensor, keep: torch.Tensor, min_sparsity: float, max_sparsity: float
) -> tuple[int, int]:
    """[lo, hi] pruned count of one layer: already pruned and min bound ≤ count ≤ candidates and max bound.

    Bounds round outwards (floor / ceil) so that min ≤ target ≤ max is always feasible over all layers.
    """
    numel = keep.numel()
    already = int((~keep.to(torch.bool)).sum())
    lo = max(already, math.floor(min_sparsity * numel + _EPS))
    hi = min(int(eligible.sum()), math.ceil(max_sparsity * numel - _EPS))
    if lo > hi:
        raise RecipeError(
            f"module `{name}` cannot satisfy its bounds: it needs at least {lo} pruned weights (already pruned "
            f"{already}, `pruning.min_layer_sparsity` = {min_sparsity!r}) but may have at most {hi} "
            f"(`pruning.max_layer_sparsity` = {max_sparsity!r} and its mask pattern)"
        )
    return lo, hi


def _global_counts(
    scores: dict[str, torch.Tensor],
    eligible: dict[str, torch.Tensor],
    keep: Mapping[str, torch.Tensor],
    target: float,
    min_sparsity: float,
    max_sparsity: float,
) -> dict[str, int]:
    """Per-layer pruned counts summing exactly to round(target · total), within per-layer bounds.

    Walk the candidates of all layers in one stable ascending order (score, then layer in name order,
    then row-major index); each step raises one layer's raw count c_i by one. The allocation
    clip(c_i, lo_i, hi_i) then grows by 0 or 1 per step, so it hits the exact total K at some step
    whenever Σ lo ≤ K ≤ Σ hi. This is water-filling with a common saliency threshold: layers at a
    bound are fixed there and the rest share the remainder.

    The walk is never built: bisection finds the threshold v*, the lowest score at which the walk
    reaches K, and only the ties at v* are walked, layer by layer. Memory: two bool temporaries of one
    layer at a time (and its converted copy if its dtype differs from the others') plus O(layers)
    Python ints, no tensor spans all layers; time: one pass over all scores per bit of their dtype.
    """
    names = list(scores)
    min_sparsity = min(min_sparsity, target)
    bounds = [_layer_bounds(n, eligible[n], keep[n], min_sparsity, max_sparsity) for n in names]
    total = _round(target * sum(keep[n].numel() for n in names))
    lo_sum, hi_sum = sum(b[0] for b in bounds), sum(b[1] for b in bounds)
    if not lo_sum <= total <= hi_sum:
        raise RecipeError(
            f"global target sparsity {target!r} needs {total} pruned weights, but current masks, the mask pattern and "
            f"`pruning.min_layer_sparsity` / `pruning.max_layer_sparsity` allow only between {lo_sum} and {hi_sum}"
        )
    dtype = functools.reduce(torch.promote_types, (scores[n].dtype for n in names))  # the walk compares in it

    def raw(compare, value: float) -> list[int]:  # per layer: eligible scores s with compare(s, value)
        return [int(torch.count_nonzero(compare(scores[n].to(dtype), value) & eligible[n])) for n in names]

    def clip(counts: list[int]) -> list[int]:
        return [min(max(c, lo), hi) for c, (lo, hi) in zip(counts, bounds)]

    if total == lo_sum:  # the walk stops before its first step
        return dict(zip(names, clip([0] * len(names))))
    threshold = _lowest_float(dtype, lambda v: sum(clip(raw(torch.le, v))) >= total)
    counts, passed = clip(raw(torch.lt, threshold)), clip(raw(torch.le, threshold))
    reached = sum(counts)  # < total: the walk just before the ties at the threshold
    for i in range(len(names)):  # the ties, layer by layer in name order, up to the step reaching total
        others = reached - counts[i]
        counts[i] = min(passed[i], total - others)
        reached = others + counts[i]
        if reached == total:
            break
    return dict(zip(names, counts))


def _lowest_float(dtype: torch.dtype, reaches) -> float:
    """Smallest non-NaN value v of float `dtype` with reaches(v), for a nondecreasing `reaches` true at +inf.

    Bisection over the floats' order-preserving integer keys: the bit pattern read as a signed integer
    for v ≥ 0, minus the magnitude bits for v < 0 (so −0.0 and +0.0 share key 0, as they compare equal).
    """
    bits = torch.finfo(dtype).bits
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]

    def value(key: int) -> float:
        pattern = key if key >= 0 else -key - 2 ** (bits - 1)  # sign bit set on top of the magnitude bits
        return torch.tensor(pattern, dtype=ints).view(dtype).item()

    inf = int(torch.tensor(math.inf, dtype=dtype).view(ints))
    low, high = -inf - 1, inf  # reaches(value(low)) is false (below −inf), reaches(value(high)) true
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reaches(value(mid)) else (mid, high)
    return value(high)


def _keep_all_but_lowest(scores: torch.Tensor, eligible: torch.Tensor, count: int) -> torch.Tensor:
    """bool (rows, cols) keep mask pruning the `count` lowest-scoring eligible weights (stable order)."""
    index = eligible.reshape(-1).nonzero().squeeze(1)
    order = torch.argsort(scores.reshape(-1)[index], stable=True)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[index[order[:count]]] = False
    return keep.view(scores.shape)

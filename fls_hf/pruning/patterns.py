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

from ..distributed import ShardCounts, summed
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
    in_place: bool = False,
    shards: ShardCounts | None = None,
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
        in_place: the caller hands its saliency tensors over (`saliency` must then be a mutable dict): they are
            turned into scores in place, `saliency` is emptied, and each is freed once its layer's mask is built,
            so no copy of them is made (also when an error is raised, `saliency` is left empty or partly consumed).
        shards: FSDP2: every tensor here is this rank's block of rows of its layer; counts, thresholds and ties are
            those of the whole layers (summed over the ranks, ties in row-major order across the blocks), so the
            ranks' masks together are the unsharded selection's.

    Returns:
        module name → new bool (rows, cols) keep mask (fresh tensors; unless `in_place`, the inputs are not
        modified).

    Memory: the scores (the saliencies' copies, or the saliencies themselves when `in_place`); no eligible mask
    for unstructured patterns (every weight is a candidate); the counts in O(layers) (`_global_allocation`);
    each mask built with a few bool temporaries of its layer (`_keep_all_but_lowest`), no index or sort.
    """
    pattern = parse_mask_type(pattern)
    _check_fraction("pruning target sparsity", target, pattern)
    if set(saliency) != set(keep):
        raise PruningStateError(f"saliency and masks cover different modules: {sorted(set(saliency) ^ set(keep))[:5]}")
    names = sorted(saliency)
    if not names:
        return {}
    if in_place:
        scores = {n: _scores_in_place(saliency.pop(n), keep[n]) for n in names}
    else:
        scores = {n: _scores(saliency[n], keep[n]) for n in names}
    eligible = {n: _eligible(pattern, n, scores[n], keep[n]) for n in names}
    totals = _layer_totals(names, eligible, keep, shards)
    threshold = None  # the global walk's threshold score: where most layers' own walks stop too
    if global_scope:
        counts, threshold = _global_allocation(scores, eligible, totals, target, min_sparsity, max_sparsity, shards)
    else:
        counts = {n: _layer_count(n, totals[n], target) for n in names}
    return {n: _keep_all_but_lowest(scores.pop(n), eligible.pop(n), counts[n], threshold, shards) for n in names}


@dataclass(frozen=True)
class _Totals:
    """A layer's weights, already-pruned weights and candidates (pattern-eligible or already pruned)."""

    numel: int
    already: int
    eligible: int


def _layer_totals(
    names: list[str],
    eligible: Mapping[str, torch.Tensor | None],
    keep: Mapping[str, torch.Tensor],
    shards: ShardCounts | None,
) -> dict[str, _Totals]:
    """Every layer's `_Totals`, over all shards (one reduction for all layers)."""
    local = []
    for n in names:
        local += [keep[n].numel(), int((~keep[n].to(torch.bool)).sum()), _num_eligible(eligible[n], keep[n])]
    flat = summed(shards, local)
    return {n: _Totals(*flat[3 * i : 3 * i + 3]) for i, n in enumerate(names)}


def _eligible(pattern: MaskPattern, name: str, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """bool (rows, cols): the pattern's candidates and the already-pruned weights; None when that is every weight
    (unstructured: candidates are all weights), so no tensor is made for it."""
    if pattern.is_unstructured:
        return None
    return pattern.candidates(name, scores) | ~keep.to(torch.bool)


def _num_eligible(eligible: torch.Tensor | None, keep: torch.Tensor) -> int:
    return keep.numel() if eligible is None else int(eligible.sum())


def _and(mask: torch.Tensor, eligible: torch.Tensor | None) -> torch.Tensor:
    """mask & eligible, in place on the fresh `mask`."""
    return mask if eligible is None else mask.logical_and_(eligible)


def _check_fraction(what: str, target: float, pattern: MaskPattern) -> None:
    if not 0.0 <= target < 1.0:
        raise RecipeError(f"{what} = {target!r} must be in [0, 1)")
    if target > pattern.max_target + _EPS:
        raise RecipeError(
            f"{what} = {target!r} exceeds {pattern.max_target:g}, the most mask_type {pattern} can prune ((M − N)/M)"
        )


def _scores(saliency: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Pruned weights → −inf (they stay pruned, counted first); NaN → +inf (never chosen first). A copy."""
    return _scores_in_place(saliency.clone(), keep)


def _scores_in_place(saliency: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`_scores`, overwriting `saliency`."""
    saliency.masked_fill_(torch.isnan(saliency), torch.inf)
    return saliency.masked_fill_(~keep.to(torch.bool), -torch.inf)


def _round(x: float) -> int:
    """Round half up: a deterministic count, unlike Python's banker's rounding."""
    return math.floor(x + 0.5)


def _layer_count(name: str, totals: _Totals, target: float) -> int:
    count, already = _round(target * totals.numel), totals.already
    if count < already:
        raise RecipeError(
            f"module `{name}` already has {already} pruned weights, more than target {target!r} allows ({count}); "
            "pruned weights never regrow, so targets must not decrease"
        )
    if count > totals.eligible:
        raise RecipeError(f"module `{name}` cannot reach target {target!r}: its mask pattern leaves too few candidates")
    return count


def _layer_bounds(name: str, totals: _Totals, min_sparsity: float, max_sparsity: float) -> tuple[int, int]:
    """[lo, hi] pruned count of one layer: already pruned and min bound ≤ count ≤ candidates and max bound.

    Bounds round outwards (floor / ceil) so that min ≤ target ≤ max is always feasible over all layers.
    """
    numel, already = totals.numel, totals.already
    lo = max(already, math.floor(min_sparsity * numel + _EPS))
    hi = min(totals.eligible, math.ceil(max_sparsity * numel - _EPS))
    if lo > hi:
        raise RecipeError(
            f"module `{name}` cannot satisfy its bounds: it needs at least {lo} pruned weights (already pruned "
            f"{already}, `pruning.min_layer_sparsity` = {min_sparsity!r}) but may have at most {hi} "
            f"(`pruning.max_layer_sparsity` = {max_sparsity!r} and its mask pattern)"
        )
    return lo, hi


def _global_allocation(
    scores: dict[str, torch.Tensor],
    eligible: dict[str, torch.Tensor | None],
    totals: Mapping[str, _Totals],
    target: float,
    min_sparsity: float,
    max_sparsity: float,
    shards: ShardCounts | None = None,
) -> tuple[dict[str, int], float | None]:
    """Per-layer pruned counts summing exactly to round(target · total), within per-layer bounds, and the
    walk's threshold score v* (None when the walk takes no step).

    Walk the candidates of all layers in one stable ascending order (score, then layer in name order,
    then row-major index); each step raises one layer's raw count c_i by one. The allocation
    clip(c_i, lo_i, hi_i) then grows by 0 or 1 per step, so it hits the exact total K at some step
    whenever Σ lo ≤ K ≤ Σ hi. This is water-filling with a common saliency threshold: layers at a
    bound are fixed there and the rest share the remainder.

    The walk is never built: bisection finds the threshold v*, the lowest score at which the walk
    reaches K (`_lowest_threshold`), and only the ties at v* are walked, layer by layer. Memory: two
    bool temporaries of one layer at a time (and its converted copy if its dtype differs from the
    others'), the few scores of each layer left inside the bisection's bracket (at most 1/16 of it),
    plus O(layers) Python ints; no tensor spans all layers.
    """
    names = list(scores)
    min_sparsity = min(min_sparsity, target)
    bounds = [_layer_bounds(n, totals[n], min_sparsity, max_sparsity) for n in names]
    total = _round(target * sum(totals[n].numel for n in names))
    lo_sum, hi_sum = sum(b[0] for b in bounds), sum(b[1] for b in bounds)
    if not lo_sum <= total <= hi_sum:
        raise RecipeError(
            f"global target sparsity {target!r} needs {total} pruned weights, but current masks, the mask pattern and "
            f"`pruning.min_layer_sparsity` / `pruning.max_layer_sparsity` allow only between {lo_sum} and {hi_sum}"
        )
    dtype = functools.reduce(torch.promote_types, (scores[n].dtype for n in names))  # the walk compares in it

    def clip(counts: list[int]) -> list[int]:
        return [min(max(c, lo), hi) for c, (lo, hi) in zip(counts, bounds)]

    if total == lo_sum:  # the walk stops before its first step
        return dict(zip(names, clip([0] * len(names)))), None
    layers = [(scores[n], eligible[n]) for n in names]
    threshold, below, at = _lowest_threshold(dtype, layers, lambda raw: sum(clip(raw)) >= total, shards)
    counts, passed = clip(below), clip(at)
    reached = sum(counts)  # < total: the walk just before the ties at the threshold
    for i in range(len(names)):  # the ties, layer by layer in name order, up to the step reaching total
        others = reached - counts[i]
        counts[i] = min(passed[i], total - others)
        reached = others + counts[i]
        if reached == total:
            break
    return dict(zip(names, counts)), threshold


_NARROW = 16  # a layer's scores inside the bisection's bracket are copied out once at most 1/16 of those it scans


def _lowest_threshold(
    dtype: torch.dtype,
    layers: list[tuple[torch.Tensor, torch.Tensor | None]],
    reaches,
    shards: ShardCounts | None = None,
) -> tuple[float, list[int], list[int]]:
    """Smallest non-NaN value v of float `dtype` with reaches(le(v)), where le(v)[i] counts the eligible scores ≤ v
    of layer i = (scores, eligible or None for all), compared in `dtype`; `reaches` is nondecreasing and true at
    +inf. Returns v, the counts of scores < v and le(v).

    Bisection over the floats' order-preserving integer keys: the bit pattern read as a signed integer
    for v ≥ 0, minus the magnitude bits for v < 0 (so −0.0 and +0.0 share key 0, as they compare equal);
    one step per bit of `dtype`. Each layer's counts at the bracket's two ends are kept (the count < v is the
    count ≤ the key below v's); once at most 1/_NARROW of the scores a layer scans lie inside the bracket, those
    are copied out and later steps scan only them (`_Scan`), so most steps touch few scores. With `shards`, the
    counts are summed over the ranks (one reduction per step); each rank narrows its own scans on its own counts.
    """
    bits = torch.finfo(dtype).bits
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]

    def value(key: int) -> float:
        pattern = key if key >= 0 else -key - 2 ** (bits - 1)  # sign bit set on top of the magnitude bits
        return torch.tensor(pattern, dtype=ints).view(dtype).item()

    inf = int(torch.tensor(math.inf, dtype=dtype).view(ints))
    scans = [_Scan(scores, eligible, dtype) for scores, eligible in layers]
    low, high = -inf - 1, inf  # reaches(le(value(low))) is false (below −inf), reaches(le(value(high))) true
    at_low, at_high = [0] * len(scans), [scan.count_le(math.inf) for scan in scans]  # this rank's counts
    all_low, all_high = [0] * len(scans), summed(shards, at_high)  # summed over the ranks
    while high - low > 1:
        mid = (low + high) // 2
        at_mid = [scan.count_le(value(mid)) for scan in scans]
        all_mid = summed(shards, at_mid)
        if reaches(all_mid):
            high, at_high, all_high = mid, at_mid, all_mid
        else:
            low, at_low, all_low = mid, at_mid, all_mid
        low_value, high_value = None if low < -inf else value(low), value(high)  # once per step, not per layer
        for scan, a, b in zip(scans, at_low, at_high):
            scan.narrow(low_value, high_value, a, b)
    return value(high), all_low, all_high


class _Scan:
    """The eligible scores of one layer that counting still has to look at: all of them, or (once the bracket
    (low, high] of the bisection holds few) a copy of those inside the bracket plus the count at or below low."""

    def __init__(self, scores: torch.Tensor, eligible: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.scores, self.eligible, self.dtype = scores, eligible, dtype
        self.inside: torch.Tensor | None = None  # 1-D copy, in `dtype`
        self.below = 0  # eligible scores ≤ the bracket's lower end when `inside` was copied

    def count_le(self, v: float) -> int:
        """Eligible scores ≤ v, for v inside the current bracket (or the first count, at +inf)."""
        if self.inside is not None:
            return self.below + int(torch.count_nonzero(self.inside <= v))
        return int(torch.count_nonzero(_and(self.scores.to(self.dtype) <= v, self.eligible)))

    def narrow(self, low: float | None, high: float, at_low: int, at_high: int) -> None:
        """The bracket is now (low, high] (low None: below −inf), with at_low / at_high eligible scores ≤ its ends."""
        size = self.scores.numel() if self.inside is None else self.inside.numel()
        if (at_high - at_low) * _NARROW > size:
            return
        values = self.scores.to(self.dtype).reshape(-1) if self.inside is None else self.inside
        inside = values <= high
        if low is not None:
            inside.logical_and_(values > low)
        if self.inside is None and self.eligible is not None:
            inside.logical_and_(self.eligible.reshape(-1))
        self.inside, self.below = values[inside], at_low


def _keep_all_but_lowest(
    scores: torch.Tensor,
    eligible: torch.Tensor | None,
    count: int,
    threshold: float | None = None,
    shards: ShardCounts | None = None,
) -> torch.Tensor:
    """bool (rows, cols) keep mask pruning the `count` lowest-scoring eligible weights (eligible None: all), ties
    by row-major index: the first `count` of a stable ascending sort of the eligible scores.

    Built without an index or a sort: for any score v with (eligible scores < v) ≤ count ≤ (eligible scores ≤ v),
    those are every eligible score < v and then the ties at v in row-major order. v is `threshold` (the global
    walk's) when it brackets `count` so, else the count-th lowest eligible score (`_lowest_threshold`); a per-row
    count of the ties finds the row where the last pruned tie lies. Memory: three bool temporaries of the layer.
    With `shards`, `scores` is this rank's rows and `count` the whole layer's: the counts below and at v are summed
    over the ranks, and the ties to prune go to the lowest rows, so first to the lower ranks.
    """
    matrix = scores.reshape(scores.shape[0] if scores.dim() > 1 else 1, -1)
    eligible = None if eligible is None else eligible.reshape(matrix.shape)
    if count == 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)

    def split(v: float) -> tuple[torch.Tensor, torch.Tensor]:  # eligible scores below v, and the ties at v
        return _and(matrix < v, eligible), _and(matrix == v, eligible)

    below = ties = None
    if threshold is not None:
        below, ties = split(threshold)
        n_below, n_ties = summed(shards, [int(torch.count_nonzero(below)), int(torch.count_nonzero(ties))])
        if not n_below <= count <= n_below + n_ties:
            below = ties = None
    if below is None:
        threshold, (n_below,), _ = _lowest_threshold(
            matrix.dtype, [(matrix, eligible)], lambda c: c[0] >= count, shards
        )
        below, ties = split(threshold)
    keep = below.logical_not_()
    rest = count - n_below  # ties to prune, the first in row-major order
    if shards is not None:  # this rank's share: what the lower ranks' ties leave
        local_ties = int(torch.count_nonzero(ties))
        rest = min(max(rest - shards.before(local_ties), 0), local_ties)
    if rest:
        ends = ties.sum(dim=1).cumsum(0)  # ties up to the end of each row
        row = int(torch.searchsorted(ends, rest))  # the row holding the last of them
        keep[:row].masked_fill_(ties[:row], False)
        cols = ties[row].nonzero()[: rest - (int(ends[row - 1]) if row else 0), 0]
        keep[row, cols] = False
    return keep.reshape(scores.shape)

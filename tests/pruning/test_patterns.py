"""fls_hf.pruning.patterns: mask_type parsing, N:M candidates, exact selection, bounds, errors."""

import math

import pytest
import torch

from fls_hf.errors import RecipeError
from fls_hf.pruning.patterns import MaskPattern, parse_mask_type, select_pruned

SHAPES = {"a": (4, 8), "b": (6, 16), "c": (3, 24)}
PATTERNS = ["unstructured", "2:4", "1:4", "4:8"]


def random_saliency(seed: int = 0, shapes=SHAPES) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) for n, s in shapes.items()}


def dense(shapes=SHAPES) -> dict:
    return {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}


def pruned(keep: dict) -> int:
    return sum(int((~k).sum()) for k in keep.values())


def nonzeros_per_group(keep: torch.Tensor, m: int) -> torch.Tensor:
    return keep.reshape(keep.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize(
    "text, n, m",
    [("unstructured", None, None), ("Unstructured", None, None), ("2:4", 2, 4), (" 4:8 ", 4, 8), ("1:2", 1, 2)],
)
def test_parse_mask_type(text, n, m):
    pattern = parse_mask_type(text)
    assert (pattern.n, pattern.m) == (n, m)
    assert parse_mask_type(pattern) is pattern


@pytest.mark.parametrize(
    "value, match",
    [
        ("garbage", "'garbage' is not understood"),
        ("2:4:8", "'2:4:8'"),
        ("", "''"),
        ("4:4", "'4:4' needs 1 <= N < M"),
        ("5:4", "'5:4' needs"),
        ("0:4", "'0:4' needs"),
        (124, "124 must be a string.*quote it"),
    ],
)
def test_parse_mask_type_rejects(value, match):
    with pytest.raises(RecipeError, match=r"pruning\.mask_type.*" + match):
        parse_mask_type(value)


def test_nm_candidates_are_the_lowest_of_each_group_with_stable_ties():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 5.0]])
    got = MaskPattern(2, 4).candidates("layer", scores)
    assert got.tolist() == [[False, True, False, True, True, True, False, False]]
    assert MaskPattern(3, 4).candidates("layer", scores).sum() == 2


def test_lowest_saliency_is_pruned_first():
    saliency = {"x": torch.tensor([[3.0, 1.0], [2.0, 4.0]])}
    keep = select_pruned(saliency, dense({"x": (2, 2)}), 0.5, "unstructured", global_scope=False)
    assert keep["x"].tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize("global_scope", [True, False], ids=["global", "per_layer"])
@pytest.mark.parametrize("mask_type", PATTERNS)
def test_exact_sparsity_over_a_gradual_run(mask_type, global_scope):
    pattern = parse_mask_type(mask_type)
    targets = [0.1, 0.3, 0.5, 0.77, 0.9] if pattern.is_unstructured else [0.1, 0.3, pattern.max_target]
    keep = dense()
    for step, target in enumerate(targets):
        new = select_pruned(random_saliency(step), keep, target, pattern, global_scope=global_scope)
        for n in SHAPES:
            assert not (new[n] & ~keep[n]).any(), "a pruned weight regrew"
            if not global_scope:
                assert int((~new[n]).sum()) == math.floor(target * new[n].numel() + 0.5)
            if not pattern.is_unstructured:
                assert (nonzeros_per_group(new[n], pattern.m) >= pattern.n).all()
        if global_scope:
            assert pruned(new) == math.floor(target * 200 + 0.5)
        keep = new
    if not pattern.is_unstructured:
        for n in SHAPES:
            assert (nonzeros_per_group(keep[n], pattern.m) == pattern.n).all()


def test_global_scope_prunes_the_globally_lowest():
    saliency = random_saliency(3)
    keep = select_pruned(saliency, dense(), 0.4, "unstructured", global_scope=True)
    everything = torch.cat([saliency[n].reshape(-1) for n in sorted(SHAPES)])
    threshold = everything.sort().values[math.floor(0.4 * everything.numel() + 0.5) - 1]
    for n in SHAPES:
        assert torch.equal(~keep[n], saliency[n] <= threshold)


def test_ties_break_by_module_name_then_index():
    shapes = {"b": (2, 5), "a": (2, 5)}
    saliency = {n: torch.zeros(s) for n, s in shapes.items()}
    keep = select_pruned(saliency, dense(shapes), 0.25, "unstructured", global_scope=True)
    assert (~keep["a"]).reshape(-1).tolist() == [True] * 5 + [False] * 5
    assert keep["b"].all()


BOUND_SHAPES = {"low": (4, 5), "high": (4, 5)}


def bounded_saliency() -> dict:
    return {"low": torch.arange(20.0).view(4, 5) / 100, "high": 10 + torch.arange(20.0).view(4, 5)}


@pytest.mark.parametrize(
    "bounds, low, high",
    [
        ({}, 20, 0),
        ({"max_sparsity": 0.7}, 14, 6),
        ({"min_sparsity": 0.4}, 12, 8),
        ({"min_sparsity": 0.4, "max_sparsity": 0.7}, 12, 8),
        ({"min_sparsity": 0.8}, 10, 10),
    ],
    ids=["none", "max", "min", "both", "min_capped_at_target"],
)
def test_global_bounds_keep_the_count_exact(bounds, low, high):
    keep = select_pruned(bounded_saliency(), dense(BOUND_SHAPES), 0.5, "unstructured", global_scope=True, **bounds)
    assert (int((~keep["low"]).sum()), int((~keep["high"]).sum())) == (low, high)
    # inside each layer the lowest saliencies go
    assert (~keep["high"]).reshape(-1).tolist() == [True] * high + [False] * (20 - high)


def test_global_counts_already_pruned_weights():
    keep = dense(BOUND_SHAPES)
    keep["high"].view(-1)[10:] = False  # 10 of "high" pruned earlier, whatever their saliency now
    new = select_pruned(bounded_saliency(), keep, 0.5, "unstructured", global_scope=True)
    assert int((~new["high"]).sum()) == 10 and int((~new["low"]).sum()) == 10
    assert not (new["high"] & ~keep["high"]).any()


def test_bounds_round_outwards_to_whole_weights():
    shapes = {"low": (1, 5), "high": (1, 5)}
    saliency = {"low": torch.arange(5.0).view(1, 5), "high": 10 + torch.arange(5.0).view(1, 5)}
    # 0.7 · 5 = 3.5 may round up to 4, otherwise round(0.7 · 10) = 7 would be infeasible
    keep = select_pruned(
        saliency, dense(shapes), 0.7, "unstructured", global_scope=True, min_sparsity=0.7, max_sparsity=0.7
    )
    assert (int((~keep["low"]).sum()), int((~keep["high"]).sum())) == (4, 3)


@pytest.mark.parametrize(
    "bounds, already, match",
    [
        ({"max_sparsity": 0.3}, 0, "needs 20 pruned weights.*allow only between 0 and 12"),
        ({"max_sparsity": 0.5}, 15, r"module `high` cannot satisfy its bounds: it needs at least 15.*at most 10"),
    ],
)
def test_infeasible_bounds_raise(bounds, already, match):
    keep = dense(BOUND_SHAPES)
    keep["high"].view(-1)[:already] = False
    with pytest.raises(RecipeError, match=match):
        select_pruned(bounded_saliency(), keep, 0.5, "unstructured", global_scope=True, **bounds)


@pytest.mark.parametrize("target", [1.0, -0.1, float("nan"), 1.5])
def test_target_outside_unit_interval(target):
    with pytest.raises(RecipeError, match=rf"target sparsity = {target!r} must be in \[0, 1\)"):
        select_pruned(random_saliency(), dense(), target, "unstructured", global_scope=True)


def test_nm_target_above_its_maximum():
    with pytest.raises(RecipeError, match="0.6 exceeds 0.5.*2:4"):
        select_pruned(random_saliency(), dense(), 0.6, "2:4", global_scope=False)


def test_nm_layer_not_divisible_names_the_module():
    shapes = {"ok": (2, 8), "encoder.odd": (2, 6)}
    with pytest.raises(RecipeError, match=r"module `encoder.odd` is too small / not divisible.*groups of 4"):
        select_pruned(random_saliency(shapes=shapes), dense(shapes), 0.25, "2:4", global_scope=True)


def test_per_layer_target_below_current_sparsity():
    keep = dense({"x": (2, 4)})
    keep["x"][0] = False
    with pytest.raises(RecipeError, match="module `x` already has 4 pruned.*never regrow"):
        select_pruned({"x": torch.rand(2, 4)}, keep, 0.25, "unstructured", global_scope=False)

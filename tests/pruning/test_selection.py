"""Issue 18, pruning bookkeeping: `_keep_all_but_lowest` (threshold + ties, no index / sort) and `select_pruned`
(no eligible mask for unstructured patterns; with in_place, scores made from the handed-over saliencies) give exactly
the masks of their literal definitions on random inputs full of ties; `prune_step` drops each layer's diag Q once
its saliency is made, has freed every score before it writes a layer, and shares the masks' tensors with the
provider."""

import random
import weakref

import pytest
import torch
from test_global_counts import _walk
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fls_hf.curvature.magnitude import MagnitudeProvider
from fls_hf.errors import RecipeError
from fls_hf.model.adapters import adapter_for
from fls_hf.pruning import surgeon
from fls_hf.pruning.masks import MaskSet
from fls_hf.pruning.patterns import (
    _keep_all_but_lowest,
    _round,
    _scores,
    _scores_in_place,
    parse_mask_type,
    select_pruned,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def literal_keep(scores: torch.Tensor, eligible: torch.Tensor | None, count: int) -> torch.Tensor:
    """The definition: Python's sort of the eligible (score, row-major index) pairs; the first `count` are pruned."""
    flat = scores.reshape(-1).double().tolist()
    ok = [True] * len(flat) if eligible is None else eligible.reshape(-1).tolist()
    order = sorted((value, i) for i, value in enumerate(flat) if ok[i])
    keep = torch.ones(len(flat), dtype=torch.bool)
    for _, i in order[:count]:
        keep[i] = False
    return keep.view(scores.shape)


def literal_candidates(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The (m − n) lowest of each group of m consecutive weights of a row, ties by position."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for r, row in enumerate(scores.double().tolist()):
        for start in range(0, len(row), m):
            group = sorted((row[start + j], j) for j in range(m))
            for _, j in group[: m - n]:
                out[r, start + j] = True
    return out


def literal_select(saliency, keep, target, mask_type, *, global_scope, min_sparsity=0.0, max_sparsity=1.0):
    """select_pruned by its definition: scores (NaN → +inf, pruned → −inf), the pattern's candidates plus the pruned
    weights, counts by the literal global walk (or round(target · numel) per layer), then the lowest per layer."""
    pattern = parse_mask_type(mask_type)
    names = sorted(saliency)
    scores, eligible = {}, {}
    for n in names:
        s = saliency[n].clone()
        s[torch.isnan(s)] = torch.inf
        s[~keep[n]] = -torch.inf
        scores[n] = s
        cand = (
            torch.ones(s.shape, dtype=torch.bool) if pattern.m is None else literal_candidates(s, pattern.n, pattern.m)
        )
        eligible[n] = cand | ~keep[n]
    if global_scope:
        counts = _walk(scores, eligible, keep, target, min_sparsity, max_sparsity)
    else:
        counts = {}
        for n in names:
            counts[n] = _round(target * keep[n].numel())
            if counts[n] < int((~keep[n]).sum()) or counts[n] > int(eligible[n].sum()):
                raise RecipeError(f"module `{n}` cannot reach target")
    return {n: literal_keep(scores[n], eligible[n], counts[n]) for n in names}


def tied_values(shape, g: torch.Generator, rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    """Few distinct values (many ties), some ±inf and signed zeros, or continuous ones."""
    if rng.random() < 0.7:
        values = torch.randint(-2, 4, shape, generator=g).to(dtype)
    else:
        values = torch.randn(shape, generator=g).to(dtype)
    values[torch.rand(shape, generator=g) < rng.choice([0.0, 0.1])] = torch.inf
    values[torch.rand(shape, generator=g) < rng.choice([0.0, 0.1])] = -torch.inf
    values[torch.rand(shape, generator=g) < rng.choice([0.0, 0.2])] = -0.0
    return values


@pytest.mark.parametrize("chunk", range(4))
def test_keep_all_but_lowest_equals_the_stable_sort(chunk):
    """Every count, eligible or not, and threshold hints that bracket the count or do not (then bisection)."""
    for seed in range(chunk * 25, chunk * 25 + 25):
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        shape = (rng.randint(1, 6), rng.randint(1, 12))
        scores = tied_values(shape, g, rng, rng.choice(DTYPES))
        eligible = None if rng.random() < 0.5 else torch.rand(shape, generator=g) < 0.7
        n_eligible = scores.numel() if eligible is None else int(eligible.sum())
        values = sorted(set(scores.reshape(-1).double().tolist()))
        for count in range(n_eligible + 1):
            expected = literal_keep(scores, eligible, count)
            for hint in [None, rng.choice(values), rng.choice(values) + 0.5, -torch.inf, torch.inf]:
                got = _keep_all_but_lowest(scores, eligible, count, hint)
                assert torch.equal(got, expected), (seed, count, hint)


def test_keep_all_but_lowest_makes_no_index_or_sort():
    """The largest temporary holds one byte per weight (a bool mask): no int64 index, no argsort, no score copy."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 40, (64, 96), generator=g).float()
    eligible = torch.rand(scores.shape, generator=g) < 0.8
    for count, hint in [(3000, None), (3000, 20.0), (3000, 3.0), (4500, None)]:
        with LargestTensor() as seen:
            got = _keep_all_but_lowest(scores, eligible, count, hint)
        assert torch.equal(got, literal_keep(scores, eligible, count))
        assert seen.nbytes <= scores.numel()


@pytest.mark.parametrize("mask_type", ["unstructured", "2:4", "1:4"])
@pytest.mark.parametrize("global_scope", [True, False])
def test_select_pruned_equals_its_definition(mask_type, global_scope):
    for seed in range(40):
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        dtypes = rng.choice([[torch.float32], [torch.float64], [torch.float16], [torch.bfloat16, torch.float32]])
        shapes = {f"m{i}": (rng.randint(1, 4), 4 * rng.randint(1, 4)) for i in range(rng.randint(1, 5))}
        saliency = {n: tied_values(s, g, rng, rng.choice(dtypes)) for n, s in shapes.items()}
        for s in saliency.values():
            s[torch.rand(s.shape, generator=g) < 0.1] = torch.nan
        keep = {n: torch.rand(s, generator=g) >= rng.choice([0.0, 0.1, 0.3]) for n, s in shapes.items()}
        low, high = sorted([rng.random(), rng.random()])
        bounds = dict(zip(["min_sparsity", "max_sparsity"], rng.choice([(0.0, 1.0), (low, high), (0.0, high)])))
        target = rng.random() * parse_mask_type(mask_type).max_target * 0.99
        args = (saliency, keep, target, mask_type)
        expected = outcome(literal_select, *args, global_scope=global_scope, **bounds)
        before = {n: s.clone() for n, s in saliency.items()}
        got = outcome(select_pruned, *args, global_scope=global_scope, **bounds)
        assert all(torch.equal(s, before[n]) or torch.equal(s.isnan(), before[n].isnan()) for n, s in saliency.items())
        handed = {n: s.clone() for n, s in saliency.items()}
        in_place = outcome(select_pruned, handed, *args[1:], global_scope=global_scope, in_place=True, **bounds)
        assert handed == {}  # handed over
        if isinstance(expected, str):
            assert isinstance(got, str) and got == in_place, seed  # the same error, handed over or not
        else:
            assert list(got) == list(in_place) == sorted(shapes)
            for n in shapes:
                assert torch.equal(got[n], expected[n]) and torch.equal(in_place[n], expected[n]), (seed, n)


def outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RecipeError as error:
        return str(error)


def test_in_place_scores_equal_the_copies():
    g = torch.Generator().manual_seed(1)
    saliency = torch.randint(0, 3, (5, 7), generator=g).float()
    saliency[torch.rand(saliency.shape, generator=g) < 0.2] = torch.nan
    keep = torch.rand(saliency.shape, generator=g) >= 0.3
    expected = _scores(saliency, keep)
    handed = saliency.clone()
    assert _scores_in_place(handed, keep) is handed and torch.equal(handed, expected)


def test_in_place_selection_makes_no_copy_over_a_layer():
    """Handed-over scores: nothing bigger than one bool per weight of the largest layer, no eligible masks."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (64, 64), "b": (32, 128), "c": (16, 16), "d": (128, 8)}
    keep = {n: torch.rand(s, generator=g) >= 0.05 for n, s in shapes.items()}
    saliency = {n: torch.randint(0, 50, s, generator=g).float() for n, s in shapes.items()}
    expected = select_pruned(saliency, keep, 0.5, "unstructured", global_scope=True, max_sparsity=0.9)
    with LargestTensor() as seen:
        got = select_pruned(saliency, keep, 0.5, "unstructured", global_scope=True, max_sparsity=0.9, in_place=True)
    assert all(torch.equal(got[n], expected[n]) for n in shapes)
    assert seen.nbytes <= max(s[0] * s[1] for s in shapes.values())


class LargestTensor(TorchDispatchMode):
    """Records the most bytes of any new tensor an aten op returns (every allocation goes through one; views and
    no-op conversions of an input are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = [*args, *(kwargs or {}).values()]
        inputs = {t.untyped_storage().data_ptr() for t in given if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


class RecordingProvider(MagnitudeProvider):
    """Magnitude curvature that remembers the diag Q tensors it hands out."""

    def __init__(self, layers, config):
        super().__init__(layers, config)
        self.handed: dict[str, weakref.ref] = {}

    def diag(self, name):
        diag = super().diag(name)
        self.handed[name] = weakref.ref(diag)
        return diag


class RecordingMasks(MaskSet):
    """Checks, as each layer's new mask is written, that no diag Q or score tensor is still alive."""

    def __init__(self, layers, masks, provider, scores: dict[str, weakref.ref]):
        super().__init__(layers, masks)
        self.provider, self.scores, self.written = provider, scores, []

    def set(self, name, keep_matrix):
        assert all(ref() is None for ref in self.provider.handed.values()), "a diag Q outlived its saliency"
        assert all(ref() is None for ref in self.scores.values()), (name, "a score outlived the selection")
        self.written.append(name)
        super().set(name, keep_matrix)


def test_prune_step_frees_each_layer_as_it_goes(monkeypatch):
    """diag Q dropped after the saliency; the scores (the saliencies, made scores in place) freed by the selection,
    before any layer is written; the provider's mask is the mask set's own tensor; the result is that of
    select_pruned + zeroing."""
    torch.manual_seed(0)
    modules = {f"l{i}": nn.Linear(8 + 4 * i, 6 + 2 * i, bias=False) for i in range(4)}
    for module in modules.values():
        with torch.no_grad():
            module.weight.copy_(torch.randint(-3, 4, module.weight.shape).float())  # many ties
    layers = {n: adapter_for(n, m) for n, m in modules.items()}
    provider = RecordingProvider(layers, MagnitudeProvider.config_class())
    weights = {n: a.weight.detach().clone() for n, a in layers.items()}
    expected = select_pruned(
        {n: surgeon.obs_saliency(w, provider.diag(n)) for n, w in weights.items()},
        {n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()},
        0.6,
        "unstructured",
        global_scope=True,
    )
    scores: dict[str, weakref.ref] = {}
    real = surgeon.obs_saliency

    def recorded(weight, diag):
        saliency = real(weight, diag)
        scores[next(n for n, a in layers.items() if a.weight.data_ptr() == weight.data_ptr())] = weakref.ref(saliency)
        return saliency

    monkeypatch.setattr(surgeon, "obs_saliency", recorded)
    masks = RecordingMasks(
        layers, {n: torch.ones(a.weight.shape, dtype=torch.bool) for n, a in layers.items()}, provider, scores
    )
    surgeon.prune_step(provider, layers, masks, 0.6, "unstructured", compensation="none")
    assert masks.written == sorted(layers) and sorted(scores) == sorted(layers)
    for n, adapter in layers.items():
        assert torch.equal(masks.keep(n), expected[n])
        assert torch.equal(adapter.weight.detach(), weights[n].masked_fill(~expected[n], 0))
        assert provider.keep[n].data_ptr() == masks.keep(n).data_ptr()  # shared, not a copy

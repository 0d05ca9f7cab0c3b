"""fls_hf.pruning.surgeon: OBS identities on an exact quadratic problem, and prune_step end to end."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fls_hf.curvature import CurvatureConfig, CurvatureProvider
from fls_hf.curvature.magnitude import MagnitudeProvider
from fls_hf.model import row_blocks
from fls_hf.model.adapters import adapter_for
from fls_hf.pruning.masks import MaskSet
from fls_hf.pruning.patterns import MaskPattern
from fls_hf.pruning.surgeon import (
    independent_compensation,
    joint_block_compensation,
    obd_saliency,
    obs_saliency,
    prune_step,
)


class ExplicitProvider(CurvatureProvider):
    """Q given as an explicit (rows·cols)² matrix per layer (row-major vec of the matrix view)."""

    def __init__(self, layers, q: dict):
        super().__init__(layers, CurvatureConfig())
        self.q = q

    def diag(self, name):
        return torch.diagonal(self.q[name]).reshape(self.layers[name].shape)

    def matvec(self, name, vector):
        return (self.q[name] @ vector.reshape(-1)).reshape(vector.shape)

    def blocks(self, name, block_size):
        rows, cols = self.layers[name].shape
        index = row_blocks(torch.arange(1, rows * cols + 1).view(rows, cols), block_size) - 1  # −1: padding
        valid = index >= 0
        i = index.clamp_min(0)
        return self.q[name][i[:, :, None], i[:, None, :]] * (valid[:, :, None] & valid[:, None, :])


def spd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def quadratic_problem(shape, block_sizes=None, seed=0):
    """Layer at its optimum w* of L(w) = ½ (w − w*)ᵀ F (w − w*); provider with Q = F⁻¹ exactly.

    `block_sizes`: F block-diagonal with these consecutive block sizes (None: one dense block).
    """
    n = shape[0] * shape[1]
    sizes = block_sizes or [n]
    f = torch.block_diag(*[spd(b, seed + k) for k, b in enumerate(sizes)])
    module = nn.Linear(shape[1], shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed + 99), dtype=torch.float64))
    layers = {"layer": adapter_for("layer", module)}
    w_star = module.weight.detach().clone()

    def loss(w):
        d = (w - w_star).reshape(-1)
        return float(0.5 * d @ f @ d)

    return layers, ExplicitProvider(layers, {"layer": torch.linalg.inv(f)}), w_star, loss


def full_obs(q: torch.Tensor, w: torch.Tensor, prune: torch.Tensor):
    """δ = −Q[:, P] (Q_PP)⁻¹ w_P with an explicit inverse, and its loss increase ½ w_Pᵀ (Q_PP)⁻¹ w_P."""
    p = prune.reshape(-1).nonzero().squeeze(1)
    inv = torch.linalg.inv(q[p][:, p])
    wp = w.reshape(-1)[p]
    return (-q[:, p] @ inv @ wp).reshape(w.shape), float(0.5 * wp @ inv @ wp)


def test_single_weight_removal_costs_exactly_its_saliency():
    layers, provider, w, loss = quadratic_problem((3, 4))
    diag = provider.diag("layer")
    saliency = obs_saliency(w, diag)
    torch.testing.assert_close(saliency, w**2 / (2 * diag))
    for q in range(12):
        prune = torch.zeros(12, dtype=torch.bool)
        prune[q] = True
        new = w + independent_compensation(provider, "layer", w, prune.view(3, 4))
        assert abs(float(new.view(-1)[q])) < 1e-12
        assert loss(new) == pytest.approx(float(saliency.view(-1)[q]), rel=1e-6)


def test_prune_step_removes_the_cheapest_weight_with_exact_compensation():
    layers, provider, w, loss = quadratic_problem((3, 4))
    masks = MaskSet.dense(layers)
    saliency = obs_saliency(w, provider.diag("layer")).view(-1)
    report = prune_step(provider, layers, masks, 1 / 12, "unstructured", compensation="independent")
    q = int(saliency.argmin())
    assert report == {"layer": {"sparsity": pytest.approx(1 / 12), "pruned_now": 1}}
    assert (~masks.keep("layer")).view(-1).nonzero().squeeze(1).tolist() == [q]
    new = layers["layer"].weight.detach()
    assert float(new.view(-1)[q]) == 0.0
    assert loss(new) == pytest.approx(float(saliency[q]), rel=1e-6)
    assert torch.equal(provider.keep["layer"], masks.keep_matrix("layer"))


# (layer shape, F's block sizes, B): B covers a row and F does not couple rows, so blockwise OBS
# is full OBS; the last case also exercises blocks padded at the row end.
JOINT_CASES = {
    "one_row_dense": ((1, 12), None, 12),
    "rows_uncoupled": ((3, 4), [4, 4, 4], 4),
    "padded": ((2, 5), [2, 2, 1] * 2, 2),
}


@pytest.mark.parametrize("case", JOINT_CASES.values(), ids=JOINT_CASES.keys())
def test_joint_block_rule_is_full_obs(case):
    shape, sizes, block = case
    layers, provider, w, loss = quadratic_problem(shape, sizes)
    prune = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    prune[[0, 3, 5, 6]] = True
    prune = prune.view(shape)
    delta = joint_block_compensation(w, provider.blocks("layer", block), prune, block)
    expected, increase = full_obs(provider.q["layer"], w, prune)
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-10)
    assert (w + delta)[prune].abs().max() < 1e-10
    assert loss(w + delta) == pytest.approx(increase, rel=1e-6)


def test_prune_step_block_compensation_matches_joint_obs_loss():
    layers, provider, w, loss = quadratic_problem((1, 12))
    masks = MaskSet.dense(layers)
    prune_step(provider, layers, masks, 5 / 12, "unstructured", compensation="block", block_size=12)
    prune = ~masks.keep_matrix("layer")
    new = layers["layer"].weight.detach()
    assert int(prune.sum()) == 5 and (new[prune] == 0).all()
    assert loss(new) == pytest.approx(full_obs(provider.q["layer"], w, prune)[1], rel=1e-6)


def test_blocks_without_pruned_weights_are_untouched_and_singular_blocks_stay_finite():
    w = torch.arange(1.0, 9.0).view(2, 4)
    q = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])  # rank-1 and zero blocks: Q_PP singular
    prune = torch.tensor([[True, True, False, False], [False, False, False, False]])
    delta = joint_block_compensation(w, q, prune, 4)
    assert torch.isfinite(delta).all() and (delta[1] == 0).all()
    prune[1, 2] = True
    assert torch.isfinite(joint_block_compensation(w, q, prune, 4)).all()


def mixed_layers(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(8, 4), "conv1d": Conv1D(6, 8), "conv": nn.Conv2d(2, 3, 2)}).to(dtype)
    return {n: a for n, m in model.named_modules() if (a := adapter_for(n, m)) is not None}


@pytest.mark.parametrize("compensation", ["block", "independent", "none"])
@pytest.mark.parametrize("global_scope", [True, False], ids=["global", "per_layer"])
def test_magnitude_provider_is_magnitude_pruning(global_scope, compensation):
    layers = mixed_layers()
    before = {n: a.weight_matrix().clone() for n, a in layers.items()}
    masks = MaskSet.dense(layers)
    provider = MagnitudeProvider(layers, CurvatureConfig(damping=0.5))
    prune_step(
        provider, layers, masks, 0.6, "unstructured", global_scope=global_scope, compensation=compensation, block_size=3
    )
    if global_scope:
        everything = torch.cat([w.abs().reshape(-1) for w in before.values()])
        cut = everything.sort().values[math.floor(0.6 * everything.numel() + 0.5) - 1]
        expected = {n: w.abs() <= cut for n, w in before.items()}
    else:
        expected = {
            n: w.abs() <= w.abs().reshape(-1).sort().values[math.floor(0.6 * w.numel() + 0.5) - 1]
            for n, w in before.items()
        }
    for n, adapter in layers.items():
        prune = ~masks.keep_matrix(n)
        assert torch.equal(prune, expected[n]), n
        assert torch.equal(adapter.weight_matrix(), before[n].masked_fill(prune, 0)), n


@pytest.mark.parametrize("global_scope", [True, False], ids=["global", "per_layer"])
def test_nm_prune_step_leaves_exactly_n_per_group(global_scope):
    layers = mixed_layers()
    before = {n: a.weight_matrix().clone() for n, a in layers.items()}
    masks = MaskSet.dense(layers)
    provider = MagnitudeProvider(layers, CurvatureConfig())
    first = prune_step(provider, layers, masks, 0.25, "2:4", global_scope=global_scope)
    report = prune_step(provider, layers, masks, 0.5, "2:4", global_scope=global_scope)
    for n, adapter in layers.items():
        w = adapter.weight_matrix()
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), n
        assert torch.equal(~masks.keep_matrix(n), MaskPattern(2, 4).candidates(n, before[n].abs())), n
        assert report[n]["sparsity"] == 0.5
    assert sum(first[n]["pruned_now"] + report[n]["pruned_now"] for n in layers) == masks.num_pruned()


def test_gradual_steps_keep_exact_global_sparsity_and_dtype():
    layers = mixed_layers(torch.bfloat16)
    masks = MaskSet.dense(layers)
    provider = MagnitudeProvider(layers, CurvatureConfig())
    for target in (0.2, 0.5, 0.8):
        prune_step(provider, layers, masks, target, "unstructured")
        assert masks.num_pruned() == math.floor(target * masks.numel() + 0.5)
        for n, adapter in layers.items():
            assert adapter.weight.dtype == torch.bfloat16
            assert (adapter.weight[~masks.keep(n)] == 0).all()


class NaNProvider(MagnitudeProvider):
    def matvec(self, name, vector):
        return torch.full_like(vector, float("nan"))


@pytest.mark.parametrize("compensation", ["block", "independent"])
def test_non_finite_compensation_falls_back_to_zeroing(compensation):
    layers = mixed_layers()
    before = {n: a.weight_matrix().clone() for n, a in layers.items()}
    masks = MaskSet.dense(layers)
    with pytest.warns(RuntimeWarning) as record:
        prune_step(
            NaNProvider(layers, CurvatureConfig()), layers, masks, 0.5, "unstructured", compensation=compensation
        )
    assert {str(r.message) for r in record} == {
        f"module `{n}`: {compensation} compensation gave non-finite weights; this layer was pruned by zeroing only "
        "(check its curvature estimate and `curvature.damping`)"
        for n in ("conv", "conv1d", "lin")
    }
    for n, adapter in layers.items():
        assert torch.equal(adapter.weight_matrix(), before[n].masked_fill(~masks.keep_matrix(n), 0))


def test_obd_saliency_is_the_cost_of_zeroing_one_weight_with_the_others_fixed():
    """Q = F⁻¹ with F block-diagonal in row blocks of 3 (cols 5: the second block is padded): removing q
    alone without compensation costs ½ w_q² F_qq exactly, which `saliency: obd` reads off Q's blocks."""
    layers, provider, w, loss = quadratic_problem((2, 5), block_sizes=[3, 2, 3, 2])
    saliency = obd_saliency(w, provider.blocks("layer", 3))
    for q in range(10):
        zeroed = w.clone().view(-1)
        zeroed[q] = 0
        assert loss(zeroed.view(2, 5)) == pytest.approx(float(saliency.view(-1)[q]), rel=1e-9)


def test_prune_step_with_obd_saliency_removes_the_cheapest_weight_to_zero():
    layers, provider, w, loss = quadratic_problem((2, 5), block_sizes=[3, 2, 3, 2])
    costs = []
    for q in range(10):
        zeroed = w.clone().view(-1)
        zeroed[q] = 0
        costs.append(loss(zeroed.view(2, 5)))
    masks = MaskSet.dense(layers)
    prune_step(provider, layers, masks, 0.1, "unstructured", compensation="none", block_size=3, saliency="obd")
    assert (~masks.keep("layer")).view(-1).nonzero().squeeze(1).tolist() == [min(range(10), key=costs.__getitem__)]

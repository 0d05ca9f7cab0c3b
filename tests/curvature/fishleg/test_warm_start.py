"""fls_hf.curvature.fishleg.warm_start: Q₀ against explicit matrices (identity, OBD diagonal) and the I/γ fallback."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fls_hf.curvature.fishleg.config import FishLegConfig
from fls_hf.curvature.fishleg.structures import build_structure
from fls_hf.curvature.fishleg.warm_start import WarmStartInputs, diagonal_q0, warm_start
from fls_hf.fisher.likelihoods import Categorical
from fls_hf.model.adapters import LayerAdapter

DAMPING = 1e-3


class TwoLayer(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(8, 4, generator=g)} for _ in range(2)]


def inputs_for(model, structure="diagonal", init="diagonal", bias_column=False, **settings):
    """WarmStartInputs as the FishLeg provider builds them (a Kronecker Q may model the bias as a column)."""
    config = FishLegConfig(structure=structure, init=init, damping=DAMPING, block_size=2, **settings)
    layers = {name: LayerAdapter(name, getattr(model, name)) for name in ("fc1", "fc2")}
    width = {name: a.shape[1] + int(bias_column) for name, a in layers.items()}
    structures = {
        name: build_structure(structure, a.shape[0], width[name], DAMPING, block_size=2, factor_block_size=None)
        for name, a in layers.items()
    }
    generator = torch.Generator().manual_seed(config.seed)
    columns = frozenset(layers) if bias_column else frozenset()
    return WarmStartInputs(layers, structures, config, Categorical(), generator, {}, columns)


def dense(structure):
    """Q written out as a matrix over the flattened (rows, width) coordinates: Q[:, k] = Q e_k."""
    rows, width = structure.shape
    with torch.no_grad():
        columns = [structure.matvec(e.reshape(rows, width)).flatten() for e in torch.eye(rows * width)]
    return torch.stack(columns, dim=1)


def test_diagonal_q0_is_one_over_fisher_plus_damping():
    fisher = torch.tensor([[0.0, 1.0, 3.0], [2.0, 4.0, 6.0]])
    expected = torch.tensor([[2.0, 2 / 3, 2 / 7], [0.4, 2 / 9, 2 / 13]])  # 1 / (F + 0.5)
    torch.testing.assert_close(diagonal_q0(fisher, 0.5, bias_column=False), expected)


def test_diagonal_q0_bias_column_is_the_row_median():
    fisher = torch.tensor([[0.0, 1.0, 3.0], [2.0, 4.0, 6.0]])
    q0 = diagonal_q0(fisher, 0.5, bias_column=True)
    assert q0.shape == (2, 4)
    torch.testing.assert_close(q0[:, :3], 1 / (fisher + 0.5))
    torch.testing.assert_close(q0[:, 3], torch.tensor([2 / 3, 2 / 9]))  # medians of (2, 2/3, 2/7) and (0.4, 2/9, 2/13)


@pytest.mark.parametrize("structure", ["diagonal", "block_diagonal", "kronecker"])
def test_identity_start_sets_q_to_identity_over_damping(structure):
    model = TwoLayer()
    inputs = inputs_for(model, structure, init="identity", bias_column=structure == "kronecker")
    torch.manual_seed(1)
    with torch.no_grad():  # move Q away from its initial I/γ first, as learning would
        for s in inputs.structures.values():
            for p in s.parameters():
                p.add_(0.3 * torch.randn_like(p))
    warm_start(inputs, model, [])  # identity reads no data
    for name, s in inputs.structures.items():
        rows, width = s.shape
        torch.testing.assert_close(dense(s), torch.eye(rows * width) / DAMPING, msg=name)


def hand_fisher_diagonal(model, calibration, examples):
    """F_qq = (1/m) Σ_n (∂ℓ_n/∂W_q)², ℓ_n = −log p(y_n | x_n), y_n drawn from the model with the start's generator;
    one batch-size-1 backward per example, the batches cycled until m examples."""
    generator = torch.Generator().manual_seed(0)
    weights = [model.fc1.weight, model.fc2.weight]
    sums = [torch.zeros_like(w) for w in weights]
    seen = 0
    for batch in itertools.cycle(calibration):
        if seen == examples:
            break
        x = batch["x"]
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(model(x), -1), 1, generator=generator)[:, 0]
        for n in range(x.shape[0]):
            grads = torch.autograd.grad(F.cross_entropy(model(x[n : n + 1]), labels[n : n + 1]), weights)
            for total, g in zip(sums, grads):
                total += g**2
        seen += x.shape[0]
    assert seen == examples
    return {"fc1": sums[0] / examples, "fc2": sums[1] / examples}


@pytest.mark.parametrize("structure", ["diagonal", "block_diagonal", "kronecker"])
def test_diagonal_start_is_one_over_the_mean_squared_per_example_gradient_plus_damping(structure):
    model, calibration = TwoLayer(), batches()
    fisher = hand_fisher_diagonal(model, calibration, examples=24)  # 3 batches of 8: the calibration cycles once
    bias_column = structure == "kronecker"  # the Kronecker Q of a biased layer has the bias column
    inputs = inputs_for(model, structure, init="diagonal", init_examples=24, bias_column=bias_column)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warm_start(inputs, model, calibration)
    for name, s in inputs.structures.items():
        expected = 1 / (fisher[name] + DAMPING)
        q = torch.diagonal(dense(s)).reshape(s.shape)
        torch.testing.assert_close(q[:, : expected.shape[1]], expected, rtol=1e-4, atol=0, msg=name)
        if bias_column:
            torch.testing.assert_close(q[:, -1], expected.median(dim=1).values, rtol=1e-4, atol=0, msg=name)
        assert torch.count_nonzero(dense(s) - torch.diag(torch.diagonal(dense(s)))) == 0  # Q₀ is diagonal


@pytest.mark.parametrize("init", ["diagonal", "kfac"])
def test_a_layer_with_non_finite_statistics_falls_back_to_identity_with_one_warning(init):
    """An infinite input feature: fc1's pre-activations are ±inf, tanh saturates to ±1 (its derivative is exactly 0),
    so fc2 and the logits stay finite, while fc1's gradient δᵀa = 0 · inf and its input statistics ĀA are NaN / inf."""
    model, calibration = TwoLayer(), batches()
    calibration[0]["x"][:, 0] = float("inf")
    inputs = inputs_for(model, init=init, init_examples=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warm_start(inputs, model, calibration)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    message = str(runtime[0].message)
    assert f"`curvature.init: {init}`" in message and "for fc1;" in message and "fc2" not in message
    assert "Q = I/γ" in message
    torch.testing.assert_close(inputs.structures["fc1"].diag(), torch.full((5, 4), 1 / DAMPING))
    q2 = inputs.structures["fc2"].diag()
    assert torch.isfinite(q2).all() and (q2 < 1 / DAMPING).any()  # fc2 kept its warm start

"""fls_hf.curvature.fishleg: the aux loss learns (F + γI)⁻¹; masking, faults, state, settings."""

import pytest
import torch
from torch import nn

from fls_hf.curvature.fishleg import FishLegConfig, FishLegProvider
from fls_hf.errors import CurvatureError, RecipeError, UnsupportedModuleError
from fls_hf.fisher.likelihoods import Gaussian
from fls_hf.model.adapters import adapter_for
from fls_hf.model.targets import resolve_targets

from helpers import tiny_bert, token_batches

N_IN, N_OUT, GAMMA = 6, 3, 1e-2


class LinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N_IN, N_OUT, bias=False)

    def forward(self, x):
        return self.lin(x)


def kronecker_problem(seed=0, n=512):
    """Gaussian likelihood, one linear layer: F = I_out ⊗ Σ_x, so (F+γ)⁻¹ = I ⊗ (Σ_x+γ)⁻¹ is representable."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(N_IN, N_IN, generator=g))
    spectrum = 1.0 / torch.arange(1, N_IN + 1).float() ** 2
    x = torch.randn(n, N_IN, generator=g) @ torch.diag(spectrum.sqrt()) @ basis.T
    sigma = x.T @ x / n
    torch.manual_seed(seed)
    return LinearNet(), {"x": x}, sigma


def make_provider(net, **overrides):
    config = FishLegConfig(**{"damping": GAMMA, "init": "identity", "warmup_steps": 0, **overrides})
    return FishLegProvider({"lin": adapter_for("lin", net.lin)}, config, likelihood=Gaussian())


def explicit_q(provider, shape=(N_OUT, N_IN)):
    eye = torch.eye(shape[0] * shape[1])
    return torch.stack([provider.matvec("lin", e.view(shape)).reshape(-1) for e in eye], 1)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("structure,lr,steps", [("kronecker", 3e-2, 1000), ("block_diagonal", 3e-2, 1000)])
def test_learned_q_reaches_exact_inverse(structure, lr, steps):
    """Budget: `steps` aux steps (Adam, lr) from Q₀ = I/γ reach < 5 % relative Frobenius error."""
    net, batch, sigma = kronecker_problem()
    target = torch.kron(torch.eye(N_OUT), torch.linalg.inv(sigma + GAMMA * torch.eye(N_IN)).contiguous())
    provider = make_provider(net, structure=structure, block_size=N_IN, aux_lr=lr)
    assert rel_err(explicit_q(provider), target) > 1.0
    first = provider.update(net, batch)
    for _ in range(steps - 1):
        last = provider.update(net, batch)
    assert rel_err(explicit_q(provider), target) < 0.05
    assert last["residual"] < 0.2 * first["residual"]
    assert last["aux_steps"] == steps


def test_preconditioned_aux_gradient_converges():
    net, batch, sigma = kronecker_problem()
    target = torch.kron(torch.eye(N_OUT), torch.linalg.inv(sigma + GAMMA * torch.eye(N_IN)).contiguous())
    provider = make_provider(net, structure="kronecker", aux_lr=1e-2, precondition_aux=True)
    errors = []
    for _ in range(4):
        for _ in range(500):
            provider.update(net, batch)
        errors.append(rel_err(explicit_q(provider), target))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.2


def test_masked_learning_targets_inverse_of_surviving_block():
    """After mask(keep), Q on kept coordinates → (F_MM + γI)⁻¹, not the sub-block of (F + γI)⁻¹."""
    net, batch, sigma = kronecker_problem(seed=1)
    provider = make_provider(net, structure="block_diagonal", block_size=N_IN, aux_lr=3e-2)
    keep = torch.ones(N_OUT, N_IN, dtype=torch.bool)
    keep[:, [1, 4]] = False
    provider.mask("lin", keep)
    for _ in range(1500):
        provider.update(net, batch)
    kept = [j for j in range(N_IN) if keep[0, j]]
    expected = torch.linalg.inv(sigma[kept][:, kept] + GAMMA * torch.eye(len(kept)))
    row0 = provider.blocks("lin", N_IN)[0][kept][:, kept]
    assert rel_err(row0, expected) < 0.05


def test_non_finite_batch_skips_step_and_keeps_q():
    net, batch, _ = kronecker_problem()
    provider = make_provider(net, structure="kronecker")
    provider.update(net, batch)
    before = {k: v.clone() for k, v in provider.state_tensors().items()}
    bad = {"x": batch["x"].clone()}
    bad["x"][0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="lin"):
        diagnostics = provider.update(net, bad)
    assert diagnostics["skipped"] == 1.0 and provider.steps_done == 1
    for key, value in provider.state_tensors().items():
        assert torch.equal(value, before[key]), key
    assert all(torch.isfinite(p).all() for p in provider._parameters())


def test_state_dict_round_trip_resumes_exactly():
    net, batch, _ = kronecker_problem()
    a = make_provider(net, structure="kronecker", aux_lr=1e-2)
    for _ in range(5):
        a.update(net, batch)
    b = make_provider(net, structure="kronecker", aux_lr=1e-2)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        a.update(net, batch)
        b.update(net, batch)
    for key, value in a.state_tensors().items():
        torch.testing.assert_close(b.state_tensors()[key], value, rtol=0, atol=0)
    assert b.steps_done == 8


def test_settings_are_validated():
    with pytest.raises(CurvatureError, match="damping"):
        FishLegConfig(damping=0.0)
    with pytest.raises(CurvatureError, match="structure"):
        FishLegConfig(structure="full")
    with pytest.raises(CurvatureError, match="fisher_product"):
        FishLegConfig(fisher_product="rank-1")


def test_memory_budget_names_the_knob():
    net, _, _ = kronecker_problem()
    with pytest.raises(CurvatureError, match="block_size"):
        make_provider(net, structure="block_diagonal", max_memory_gib=1e-9)


def test_memory_estimate_counts_adam_state_only_when_q_learns():
    """B = 6 blocks on a 3 × 6 layer: 3 · (36 + 6) values; ×16 bytes with aux steps, ×4 without."""
    net, _, _ = kronecker_problem()
    learning = make_provider(net, structure="block_diagonal", block_size=N_IN, warmup_steps=1)
    fixed = make_provider(net, structure="block_diagonal", block_size=N_IN, refinement_steps=0)
    assert learning.estimated_bytes() == 3 * 42 * 16
    assert fixed.estimated_bytes() == 3 * 42 * 4


def test_unsupported_targeted_module_is_refused():
    model = tiny_bert()
    with pytest.raises(UnsupportedModuleError, match="LayerNorm"):
        resolve_targets(model, ["re:.*attention\\.output\\.LayerNorm"])
    with pytest.raises(RecipeError, match="matches no module"):
        resolve_targets(model, ["re:.*does_not_exist"])


def test_refines_on_tiny_bert_with_unlabelled_batches():
    """Categorical GGN on a real transformer; batches without labels work (labels are never needed)."""
    model = tiny_bert()
    layers = resolve_targets(model, ["re:.*encoder\\.layer\\.\\d+\\..*(query|value|dense)$"])
    # A freshly initialised BERT has a tiny Fisher: a small damping makes F, not γ, dominate the residual.
    config = FishLegConfig(damping=1e-7, init="identity", warmup_steps=100, aux_lr=3e-3, aux_lr_schedule="linear")
    provider = FishLegProvider(layers, config)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in token_batches(n_batches=2)]
    first = provider.update(model, batches[0])
    last = provider.prepare(model, batches)
    assert last["aux_steps"] == 101 and last["residual"] < 0.5 * first["residual"]
    assert all(torch.isfinite(provider.diag(n)).all() for n in layers)


def test_gradient_direction_u_on_tiny_bert():
    """u along the sampled-label gradient (the optimiser's choice), masked and scaled like a Gaussian u."""
    model = tiny_bert()
    layers = resolve_targets(model, ["re:.*encoder\\.layer\\.0\\..*(query|dense)$"])
    provider = FishLegProvider(
        layers, FishLegConfig(damping=1e-7, init="identity", u_sampling="gradient", warmup_steps=0)
    )
    keep = torch.ones(layers["bert.encoder.layer.0.attention.self.query"].shape, dtype=torch.bool)
    keep[:, :4] = False
    provider.mask("bert.encoder.layer.0.attention.self.query", keep)
    batch = token_batches(n_batches=1)[0]
    u = provider._draw_u(model, batch)
    for name, vec in u.items():
        assert vec.shape == layers[name].shape and torch.isfinite(vec).all()
        assert vec.pow(2).mean().item() == pytest.approx(float(provider._keep(name).mean()), rel=0.3)
    assert (u["bert.encoder.layer.0.attention.self.query"][:, :4] == 0).all()
    assert provider.update(model, batch)["aux_steps"] == 1.0


@pytest.mark.parametrize("structure", ["block_diagonal", "diagonal"])
def test_fisher_init_is_the_exact_true_fisher_block_inverse(structure):
    """init: fisher, init_labels: expected on a linear softmax classifier: Q₀'s row blocks equal
    (γI + (1/n) Σ_n H_n,ii x_n x_nᵀ)⁻¹ with H_n = diag p_n − p_n p_nᵀ (diagonal: 1 / the blocks' diagonal, OBD)."""
    from fls_hf.fisher.likelihoods import Categorical

    torch.manual_seed(0)
    net = LinearNet()
    x = torch.randn(8, N_IN)
    config = FishLegConfig(
        damping=GAMMA,
        init="fisher",
        init_labels="expected",
        init_examples=8 * N_OUT,
        warmup_steps=0,
        structure=structure,
        block_size=N_IN,
    )
    provider = FishLegProvider({"lin": adapter_for("lin", net.lin)}, config, likelihood=Categorical())
    provider.prepare(net, [{"x": x}])

    with torch.no_grad():
        p = torch.softmax(net(x), -1)
    blocks = []
    for i in range(N_OUT):
        h = p[:, i] * (1 - p[:, i])
        fisher = (h[:, None, None] * x[:, :, None] * x[:, None, :]).mean(0) + GAMMA * torch.eye(N_IN)
        blocks.append(
            torch.linalg.inv(fisher) if structure == "block_diagonal" else torch.diag(1 / torch.diagonal(fisher))
        )
    torch.testing.assert_close(explicit_q(provider), torch.block_diag(*blocks), rtol=1e-4, atol=1e-4)


def test_fisher_init_refuses_the_kronecker_structure():
    with pytest.raises(CurvatureError, match="`curvature.init` = 'fisher'.*kronecker"):
        FishLegConfig(structure="kronecker", init="fisher")


def _expected_fisher_provider(net, **overrides):
    """init: fisher with the exact (expected-label) Fisher: a deterministic warm start to compare against."""
    from fls_hf.fisher.likelihoods import Categorical

    config = FishLegConfig(
        **{
            "damping": GAMMA,
            "init": "fisher",
            "init_labels": "expected",
            "init_examples": 8 * N_OUT,
            "warmup_steps": 0,
            "structure": "diagonal",
            "aux_lr": 1e-1,
            **overrides,
        }
    )
    return FishLegProvider({"lin": adapter_for("lin", net.lin)}, config, likelihood=Categorical())


def test_restart_is_a_fresh_warm_start_on_the_current_weights():
    """`rewarm`: after the weights change, restart() gives the Q a new provider would start from, Adam cleared."""
    torch.manual_seed(0)
    net, batch = LinearNet(), {"x": torch.randn(8, N_IN)}
    provider = _expected_fisher_provider(net)
    provider.prepare(net, [batch])
    for _ in range(3):
        provider.update(net, batch)
    assert provider.optimizer.state
    with torch.no_grad():
        net.lin.weight.mul_(4.0)  # sharper softmax: a different Fisher
    stale = explicit_q(provider)
    provider.restart(net, [batch])
    fresh = _expected_fisher_provider(net)
    fresh.prepare(net, [batch])
    torch.testing.assert_close(explicit_q(provider), explicit_q(fresh))
    assert rel_err(stale, explicit_q(fresh)) > 0.1  # the restart mattered
    assert not provider.optimizer.state
    assert provider.steps_done == 3  # the step count (lr schedule, RNG stream) carries on


@pytest.mark.parametrize("rewarm", [False, True])
def test_pruner_rewarms_before_later_pruning_steps_only_when_asked(rewarm):
    import copy

    from fls_hf.pruning.pruner import Pruner

    torch.manual_seed(0)
    net, batch = LinearNet(), {"x": torch.randn(8, N_IN)}
    recipe = {
        "pruning": {"method": "fishleg", "targets": ["lin"], "compensation": "none"},
        "curvature": {
            "likelihood": "categorical",
            "damping": GAMMA,
            "init": "fisher",
            "init_labels": "expected",
            "init_examples": 8 * N_OUT,
            "warmup_steps": 0,
            "refinement_steps": 0,
            "num_batches": 1,
            "structure": "diagonal",
            "rewarm": rewarm,
        },
    }
    pruner = Pruner(net, recipe)
    pruner.prune_to(net, 0.3, [batch])
    first = explicit_q(pruner.provider)
    with torch.no_grad():
        net.lin.weight.mul_(4.0)
    reference = copy.deepcopy(net)
    pruner.prune_to(net, 0.5, [batch])
    fresh = _expected_fisher_provider(reference)
    fresh.prepare(reference, [batch])
    kept = reference.lin.weight.flatten() != 0  # Q on pruned coordinates is never read (and kept out of the warm start)
    expected = explicit_q(fresh) if rewarm else first
    torch.testing.assert_close(explicit_q(pruner.provider)[kept][:, kept], expected[kept][:, kept])

"""Row-wise OBC (`pruning/obc.py`) against explicit matrices, and through the surgeon with the K-FAC provider."""

from __future__ import annotations

import pytest
import torch

from fls_hf import oneshot
from fls_hf.curvature import KFACConfig, KFACProvider, RowModel
from fls_hf.errors import CurvatureError, RecipeError
from fls_hf.model import adapter_for
from fls_hf.pruning import MaskSet, Pruner, prune_step
from fls_hf.pruning.obc import obc_compensation, obc_saliency, sweep_compensation

from helpers import MLP, row_loss, tiny_bert, token_batches, wide_row_problem

GAMMA = 1e-2


def spd(n: int, seed: int) -> torch.Tensor:
    """A rank-deficient PSD Ā (as from fewer tokens than inputs): the damping γ must carry the null space."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n - 2, generator=g, dtype=torch.float64)
    return x @ x.T / n


def row_problem(rows=5, cols=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    a_bar = spd(cols, seed + 1)
    row_weight = torch.rand(rows, generator=g, dtype=torch.float64) + 0.1
    row_weight[2] = 1e-9  # a row the Fisher barely sees: damping makes it magnitude-like
    pruned = torch.rand(rows, cols, generator=g) < 0.5
    pruned[0] = False  # a row with nothing pruned
    pruned[1] = True
    pruned[1, 3] = False  # all but one pruned
    lam, basis = torch.linalg.eigh(a_bar)
    return w, a_bar, row_weight, pruned, RowModel(basis, lam.clamp_min(0), row_weight, GAMMA)


def full_hessian(a_bar: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """M = blockdiag_i(G_ii Ā) + γI over the row-major vec(W)."""
    return torch.block_diag(*[gi * a_bar for gi in row_weight]) + GAMMA * torch.eye(
        len(row_weight) * len(a_bar), dtype=torch.float64
    )


def constrained_optimum(w: torch.Tensor, m: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """argmin_w' ½ (w' − w)ᵀ M (w' − w) s.t. w'_P = 0, by the KKT system on the kept coordinates of vec(W)."""
    flat, p = w.reshape(-1), pruned.reshape(-1)
    k = ~p
    new = torch.zeros_like(flat)
    # d_K = M_KK⁻¹ M_KP w_P (d_P = −w_P)
    new[k] = flat[k] + torch.linalg.solve(m[k][:, k], m[k][:, p] @ flat[p])
    return new.view_as(w)


def test_obc_compensation_is_the_exact_obs_optimum_of_the_damped_row_fisher():
    w, a_bar, row_weight, pruned, model = row_problem()
    new = w + obc_compensation(w, model, pruned)
    assert torch.all(new[pruned].abs() < 1e-12)
    torch.testing.assert_close(
        new, constrained_optimum(w, full_hessian(a_bar, row_weight), pruned), rtol=1e-8, atol=1e-10
    )
    torch.testing.assert_close(new[0], w[0])  # nothing pruned in the row: nothing moves


def test_obc_saliency_is_the_exact_single_weight_obs_loss_under_the_full_hessian():
    w, a_bar, row_weight, _, model = row_problem(rows=3, cols=4)
    m = full_hessian(a_bar, row_weight)
    saliency = obc_saliency(w, model)
    for q in range(w.numel()):
        pruned = torch.zeros(w.numel(), dtype=torch.bool)
        pruned[q] = True
        d = (constrained_optimum(w, m, pruned.view_as(w)) - w).reshape(-1)
        assert float(0.5 * d @ m @ d) == pytest.approx(float(saliency.reshape(-1)[q]), rel=1e-8)
    # a row the Fisher does not see costs what the damping term says: ρ → γ w² / 2
    model_blind = RowModel(model.basis, model.eigenvalues, torch.zeros(3, dtype=torch.float64), GAMMA)
    torch.testing.assert_close(obc_saliency(w, model_blind), GAMMA * w.square() / 2)


def test_a_column_scaled_row_model_is_solved_exactly():
    """H_i = S_i⁻¹ (G_ii Ā + γI) S_i⁻¹ (a learned Kronecker Q's rows): compensation and saliencies are the exact OBS
    ones under that Hessian, with and without weights already pruned."""
    w, a_bar, row_weight, pruned, model = row_problem(rows=4, cols=5, seed=5)
    scale = torch.rand(4, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
    scaled = RowModel(model.basis, model.eigenvalues, row_weight, GAMMA, scale)
    m = torch.diag(1 / scale.reshape(-1)) @ full_hessian(a_bar, row_weight) @ torch.diag(1 / scale.reshape(-1))
    new = w + obc_compensation(w, scaled, pruned)
    torch.testing.assert_close(new, constrained_optimum(w, m, pruned), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(scaled.inverse_diag().reshape(-1), torch.linalg.inv(m).diagonal())
    w = w.masked_fill(pruned, 0.0)
    saliency = obc_saliency(w, scaled, ~pruned)
    for q in (~pruned).reshape(-1).nonzero().squeeze(1).tolist():
        both = pruned.reshape(-1).clone()
        both[q] = True
        d = (constrained_optimum(w, m, both.view_as(w)) - w).reshape(-1)
        assert float(0.5 * d @ m @ d) == pytest.approx(float(saliency.reshape(-1)[q]), rel=1e-7)


@pytest.mark.parametrize("scaled", [False, True])
def test_sweep_is_the_exact_obs_update_when_the_pruned_weights_come_first(scaled, monkeypatch):
    """With one G_ii for every row (so G_ii (Ā + λI) is the exact row Hessian) and each row's pruned weights before
    its kept ones, the sequential sweep is the exact joint OBS update, across lazy-batch boundaries too."""
    from fls_hf.pruning import obc

    monkeypatch.setattr(obc, "_SWEEP_BLOCK", 3)
    w, a_bar, _, _, model = row_problem(rows=4, cols=7, seed=6)
    scale = torch.rand(4, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    model = RowModel(model.basis, model.eigenvalues, torch.full((4,), 0.7, dtype=torch.float64), GAMMA)
    if scaled:
        model = RowModel(model.basis, model.eigenvalues, model.row_weight, GAMMA, scale)
    pruned = torch.arange(7)[None, :] < torch.tensor([[0], [2], [4], [6]])  # 0, 2, 4, 6 leading columns
    delta, used = sweep_compensation(w, model, pruned)
    assert torch.equal(used, pruned)
    sweep = w + delta
    exact = w + obc_compensation(w, model, pruned)
    assert torch.all(sweep[pruned] == 0)
    torch.testing.assert_close(sweep, exact, rtol=1e-7, atol=1e-9)


def test_sweep_with_interleaved_masks_zeroes_exactly_and_never_beats_the_exact_rule():
    """Pruned weights anywhere: exact zeros, finite, and a loss (under the row Hessians) no lower than the exact
    joint optimum's — the sweep only compensates columns after each pruned one."""
    w, a_bar, _, pruned, model = row_problem(rows=5, cols=7, seed=8)
    row_weight = torch.full((5,), 0.7, dtype=torch.float64)
    model = RowModel(model.basis, model.eigenvalues, row_weight, GAMMA)
    m = full_hessian(a_bar, row_weight)
    sweep = sweep_compensation(w, model, pruned)[0].reshape(-1)
    exact = (obc_compensation(w, model, pruned) + w).reshape(-1) - w.reshape(-1)
    assert torch.all((w.reshape(-1) + sweep)[pruned.reshape(-1)] == 0) and torch.isfinite(sweep).all()
    assert float(sweep @ m @ sweep) >= float(exact @ m @ exact) * (1 - 1e-12)
    assert float(sweep @ m @ sweep) < float(w.reshape(-1)[pruned.reshape(-1)] @ w.reshape(-1)[pruned.reshape(-1)]) * 1e3


def test_chunks_do_not_change_the_result(monkeypatch):
    from fls_hf.pruning import obc

    w, _, _, pruned, model = row_problem(rows=9, cols=6, seed=4)
    model = RowModel(model.basis, model.eigenvalues, torch.rand(9, dtype=torch.float64) + 0.1, GAMMA)
    whole = obc_compensation(w, model, pruned)
    monkeypatch.setattr(obc, "_CHUNK_ELEMENTS", 40)  # one or two rows per solve
    torch.testing.assert_close(obc_compensation(w, model, pruned), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_kfac_q_is_the_exactly_damped_kronecker_inverse(mode):
    model = MLP((6, 5, 3))
    g = torch.Generator().manual_seed(1)
    batches = [{"input": torch.randn(8, 6, generator=g)} for _ in range(2)]
    layers = {n: adapter_for(n, model[int(n)]) for n in ("0", "2")}
    config = KFACConfig(damping=1e-2, damping_mode=mode, num_examples=16, likelihood="categorical")
    provider = KFACProvider(layers, config)
    diagnostics = provider.ready(model, batches)
    fishers = {n: torch.kron(provider.g[n].double(), provider.a_bar[n].double()) for n in layers}
    # relative: γ = 1e-2 × the mean diagonal of the K-FAC Fisher over every weight of both layers
    scale = torch.cat([f.diagonal() for f in fishers.values()]).mean() if mode == "relative" else 1.0
    gamma = 1e-2 * float(scale)
    assert diagnostics["damping"] == pytest.approx(gamma, rel=1e-6) and provider.damping == diagnostics["damping"]
    for name, adapter in layers.items():
        rows, cols = adapter.shape
        a_bar, g_full = provider.a_bar[name].double(), provider.g[name].double()
        assert g_full.shape == (rows, rows)
        q = torch.linalg.inv(fishers[name] + gamma * torch.eye(rows * cols, dtype=torch.float64))
        v = torch.randn(rows, cols, generator=g)
        torch.testing.assert_close(
            provider.matvec(name, v).double().reshape(-1), q @ v.double().reshape(-1), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(provider.diag(name).double().reshape(-1), q.diagonal(), rtol=1e-4, atol=1e-5)
        # the row model is the same Fisher with G's off-diagonal dropped: H_i = G_ii Ā + γI
        row_q = torch.linalg.inv(
            torch.kron(torch.diag(g_full.diagonal()), a_bar) + gamma * torch.eye(rows * cols, dtype=torch.float64)
        )
        torch.testing.assert_close(
            provider.row_model(name).inverse_diag().reshape(-1), row_q.diagonal(), rtol=1e-6, atol=1e-9
        )


def test_the_package_default_is_kfac_with_row_wise_obc_and_auto_falls_back_to_block():
    """`compensation: auto` (default) resolves to obc where the method has a row model (kfac, the default method) and
    to block otherwise; the default recipe prunes to the exact target with finite weights."""
    model = tiny_bert()
    pruner = Pruner(model, {"pruning": {"final_sparsity": 0.5}, "curvature": {"num_examples": 8}})
    assert (pruner.recipe.pruning.method, pruner.compensation) == ("kfac", "obc")
    pruner.prune_to(model, 0.5, token_batches(n_batches=2))
    assert pruner.masks.global_sparsity() == pytest.approx(0.5, abs=1e-3)
    assert all(torch.isfinite(a.weight_matrix()).all() for a in pruner.layers.values())
    assert pruner.provider.damping < 1e-2  # relative γ: 1e-2 × the mean K-FAC Fisher diagonal (≪ 1 here)
    for method in ("block_fisher", "fishleg", "magnitude"):
        assert Pruner(tiny_bert(), {"pruning": {"method": method}}).compensation == "block"


@pytest.mark.parametrize(
    "pattern, scope, solver",
    [
        ("unstructured", True, "exact"),
        ("unstructured", False, "exact"),
        ("2:4", True, "exact"),
        ("unstructured", True, "sweep"),
        ("2:4", False, "sweep"),
        ("unstructured", True, "joint"),
        ("2:4", True, "joint"),
        ("unstructured", True, "cg"),
    ],
)
def test_prune_step_with_obc_reaches_the_exact_count_and_zeroes_what_it_prunes(pattern, scope, solver):
    model = tiny_bert()
    pruner = Pruner(
        model,
        {
            "pruning": {
                "method": "kfac",
                "compensation": "obc",
                "final_sparsity": 0.5,
                "mask_type": pattern,
                "global_sparsity": scope,
                "obc_solver": solver,
                "obc_rounds": 2,
            },
            "curvature": {"num_examples": 8},
        },
    )
    check_exact_compensated_half(model, pruner, pattern, scope)


def check_exact_compensated_half(model, pruner: Pruner, pattern: str = "unstructured", scope: bool = True) -> None:
    """Prune to 50 %: the exact count (per layer without global scope; N:M groups exact), finite weights, zeros
    where pruned and kept weights moved by the compensation."""
    before = {n: a.weight_matrix().clone() for n, a in pruner.layers.items()}
    pruner.prune_to(model, 0.5, token_batches(n_batches=2))
    total = sum(a.weight.numel() for a in pruner.layers.values())
    assert sum(int((a.weight == 0).sum()) for a in pruner.layers.values()) == round(0.5 * total)
    moved = 0
    for name, adapter in pruner.layers.items():
        w, keep = adapter.weight_matrix(), pruner.masks.keep_matrix(name)
        assert torch.isfinite(w).all() and torch.all(w[~keep] == 0)
        if pattern == "2:4":
            assert torch.all(keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2)
        if not scope:
            assert (~keep).sum() == round(0.5 * keep.numel())
        moved += int((w[keep] != before[name][keep]).sum())
    assert moved > 0  # the kept weights were compensated


def test_fishleg_kronecker_q_prunes_with_row_wise_obc():
    """A learned Kronecker Q has a row model: `auto` picks obc, and one-shot pruning with it (after aux steps) reaches
    the exact count with finite, compensated weights."""
    model = tiny_bert()
    spec = {
        "pruning": {"method": "fishleg", "final_sparsity": 0.5},
        "curvature": {"structure": "kronecker", "init_examples": 8, "warmup_steps": 2},
    }
    pruner = Pruner(model, spec)
    assert pruner.compensation == "obc"
    check_exact_compensated_half(model, pruner)


def test_obc_keeps_diag_g_only_and_prunes_as_with_the_full_g():
    """Under compensation obc, kfac's G defaults to its diagonal (the row model reads G_ii only): the same masks and
    weights as with the full G, and a checkpoint holding a full G still loads."""
    spec = {"pruning": {"method": "kfac", "final_sparsity": 0.5, "obc_rounds": 2}, "curvature": {"num_examples": 8}}
    pruned = {}
    for limit in (None, 4096):
        model = tiny_bert()
        pruner = Pruner(model, {**spec, "curvature": {**spec["curvature"], "max_full_g_rows": limit}})
        assert all(g.dim() == (1 if limit is None else 2) for g in pruner.provider.g.values())
        pruner.prune_to(model, 0.5, token_batches(n_batches=2))
        pruned[limit] = (pruner, {n: a.weight_matrix().clone() for n, a in pruner.layers.items()})
    (diag_pruner, diag_w), (full_pruner, full_w) = pruned[None], pruned[4096]
    for name in diag_w:
        assert torch.equal(diag_pruner.masks.keep_matrix(name), full_pruner.masks.keep_matrix(name))
        torch.testing.assert_close(diag_w[name], full_w[name], rtol=1e-5, atol=1e-7)
    diag_pruner.provider.load_state_dict(full_pruner.provider.state_dict())
    for name, g in diag_pruner.provider.g.items():
        torch.testing.assert_close(g, full_pruner.provider.g[name].diagonal())


def test_obc_without_a_row_model_is_refused_early():
    with pytest.raises(RecipeError, match=r"'fishleg' with `curvature.structure` = 'diagonal' has none"):
        Pruner(tiny_bert(), {"pruning": {"method": "fishleg", "compensation": "obc"}})
    layers = {"0": adapter_for("0", MLP()[0])}
    from fls_hf.curvature import CurvatureConfig, MagnitudeProvider

    with pytest.raises(CurvatureError, match="needs a row-wise curvature model"):
        prune_step(
            MagnitudeProvider(layers, CurvatureConfig()),
            layers,
            MaskSet.dense(layers),
            0.5,
            "unstructured",
            compensation="obc",
        )


def test_oneshot_kfac_obc_on_a_causal_lm_keeps_it_finite():
    from helpers import tiny_gpt2

    model = tiny_gpt2()
    report = oneshot(
        model,
        token_batches(n_batches=2),
        {"pruning": {"method": "kfac", "compensation": "obc", "final_sparsity": 0.6}, "curvature": {"num_examples": 8}},
    )
    assert report.zeros == round(0.6 * report.numel)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "coupled, saliency, compensation, says",
    [
        (1, "obs", "none", None),  # diagonal Q: OBS = OBD, nothing to compensate
        (50, "obs", "block", None),  # oBERT: joint OBS inside the blocks Q has
        (None, "obs", "obc", None),
        (50, "obs", "none", "use `pruning.saliency: obd`"),
        (32, "obd", "independent", "ignores the interactions"),
        (None, "obs", "block", "blocks of the inverse are not inverses of the blocks"),
    ],
)
def test_rule_mismatch_names_the_pair_to_use(coupled, saliency, compensation, says):
    from fls_hf.pruning.surgeon import rule_mismatch

    message = rule_mismatch(coupled, saliency, compensation)
    assert (message is None) if says is None else (says in message)


def test_pruner_warns_once_on_a_kronecker_q_with_block_compensation():
    spec = {"pruning": {"method": "fishleg", "compensation": "block"}, "curvature": {"structure": "kronecker"}}
    with pytest.warns(UserWarning, match=r"`pruning.method: kfac` with `pruning.compensation: obc`") as record:
        Pruner(tiny_bert(), spec)
    assert sum("recipe with `pruning.method`" in str(r.message) for r in record) == 1


def test_gradual_trainer_run_with_kfac_obc_reaches_the_target(tmp_path):
    from fls_hf import FishLegPruningTrainer, sparsity_report

    from test_trainer import dataset, training_args

    spec = {
        "pruning": {
            "method": "kfac",
            "compensation": "obc",
            "init_sparsity": 0.3,
            "final_sparsity": 0.7,
            "start_step": 0,
            "end_step": 6,
            "update_frequency": 2,
        },
        "curvature": {"num_examples": 8},
    }
    trainer = FishLegPruningTrainer(
        model=tiny_bert(), recipe=spec, train_dataset=dataset(), args=training_args(tmp_path, max_steps=8)
    )
    trainer.train()
    report = sparsity_report(trainer.model, trainer.recipe)
    assert report.zeros == round(0.7 * report.numel)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_obc_saliency_with_pruned_weights_is_the_single_weight_obs_loss_given_them():
    """With P already at zero, removing kept weight q costs ½ dᵀMd for the optimum d keeping P ∪ {q} at zero."""
    w, a_bar, row_weight, pruned, model = row_problem(rows=4, cols=6, seed=2)
    w = w.masked_fill(pruned, 0.0)
    m = full_hessian(a_bar, row_weight)
    saliency = obc_saliency(w, model, ~pruned)
    assert torch.all(saliency[pruned] == 0)
    for q in (~pruned).reshape(-1).nonzero().squeeze(1).tolist():
        both = pruned.reshape(-1).clone()
        both[q] = True
        d = (constrained_optimum(w, m, both.view_as(w)) - w).reshape(-1)
        assert float(0.5 * d @ m @ d) == pytest.approx(float(saliency.reshape(-1)[q]), rel=1e-6)


@pytest.mark.parametrize("solver", ["exact", "joint"])
def test_obc_rounds_are_explicit_rounds_of_obs_on_the_full_row_hessian(solver):
    """Each round: rank survivors by w_q² / (2 [(M_KK)⁻¹]_qq) over both layers (joint: [M⁻¹]_qq, the weights as they
    are), prune the round's count, then the exact constrained optimum; M = blockdiag over layers and rows of
    G_ii Ā + γI, built explicitly."""
    from fls_hf.pruning.schedule import recomputation_targets

    model = MLP((8, 6, 4))
    g = torch.Generator().manual_seed(3)
    batches = [{"input": torch.randn(16, 8, generator=g)} for _ in range(2)]
    layers = {n: adapter_for(n, model[int(n)]) for n in ("0", "2")}
    provider = KFACProvider(
        layers, KFACConfig(damping=GAMMA, damping_mode="absolute", num_examples=32, likelihood="categorical")
    )
    provider.ready(model, batches)
    rows = {n: provider.row_model(n) for n in layers}
    m = torch.block_diag(*[full_hessian(r.a_bar(), r.row_weight) for r in rows.values()])
    w = torch.cat([a.weight_matrix().double().reshape(-1) for a in layers.values()])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for sub_target in recomputation_targets(0.0, 0.6, 3):
        kept = (~pruned).nonzero().squeeze(1)
        inverse = torch.linalg.inv(m[kept][:, kept] if solver == "exact" else m).diagonal()
        order = kept[torch.argsort(w[kept].square() / (2 * (inverse if solver == "exact" else inverse[kept])))]
        pruned[order[: round(sub_target * len(w)) - int(pruned.sum())]] = True
        w = constrained_optimum(w[None], m, pruned[None])[0]
    masks = MaskSet.dense(layers)
    prune_step(provider, layers, masks, 0.6, "unstructured", compensation="obc", obc_rounds=3, obc_solver=solver)
    got = torch.cat([a.weight_matrix().double().reshape(-1) for a in layers.values()])
    assert torch.equal(got == 0, pruned)
    torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)


def test_primal_and_dual_forms_agree():
    """obc_solve picks, per row, the cheaper exact form; both must give the same δW and diag (H_KK)⁻¹."""
    from fls_hf.pruning.obc import _dual_rows, _primal_rows

    w, a_bar, row_weight, _, model = row_problem(rows=6, cols=9, seed=5)
    keep = torch.rand(6, 9, generator=torch.Generator().manual_seed(6)) < torch.linspace(0.2, 0.9, 6)[:, None]
    keep[:, 0] = True  # every row keeps something and prunes something
    keep[:, 1] = False
    rows = torch.arange(6)
    coupling = (torch.where(keep, 0.0, w) @ model.a_bar()) * row_weight[:, None]
    results = []
    for solve in (_primal_rows, _dual_rows):
        delta, diagonal = -torch.where(keep, 0.0, w), torch.ones_like(w)
        solve(w, coupling, model.a_bar(), model, rows, keep, delta, diagonal)
        results.append((delta, diagonal))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-8)
    new = w + results[0][0]
    torch.testing.assert_close(
        new, constrained_optimum(w, full_hessian(a_bar, row_weight), ~keep), rtol=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("solve_name", ["_primal_rows", "_dual_rows"])
def test_compensation_from_float32_factors_is_refined_to_the_float64_optimum(solve_name):
    """Compensation alone (no diagonal asked) factors in float32 and refines in float64: the result is the exact
    optimum to float64-level accuracy, not float32's ~1e-4 relative (30 columns: the factors carry real rounding)."""
    from fls_hf.pruning import obc

    w, a_bar, row_weight, _, model = row_problem(rows=6, cols=30, seed=7)
    keep = torch.rand(6, 30, generator=torch.Generator().manual_seed(8)) < 0.5
    keep[:, 0], keep[:, 1] = True, False
    coupling = (torch.where(keep, 0.0, w) @ model.a_bar()) * row_weight[:, None]
    delta = -torch.where(keep, 0.0, w)
    assert obc._refined_solve(coupling, model.a_bar(), model, torch.arange(6), keep) is not None  # no fallback
    getattr(obc, solve_name)(w, coupling, model.a_bar(), model, torch.arange(6), keep, delta, None)
    optimum = constrained_optimum(w, full_hessian(a_bar, row_weight), ~keep)
    torch.testing.assert_close(w + delta, optimum, rtol=1e-9, atol=1e-11)


def test_an_ill_conditioned_row_falls_back_to_float64_factors():
    """Condition number ~1e12 (a tiny damping under a wide spectrum): float32 factors cannot serve, so the chunk is
    solved in float64 and still reaches the explicit optimum."""
    from fls_hf.pruning import obc

    cols = 12
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(-11, 1, cols, dtype=torch.float64)
    a_bar = (basis * eigenvalues) @ basis.T
    row_weight = torch.ones(3, dtype=torch.float64)
    model = RowModel(basis, eigenvalues, row_weight, 1e-12)
    w = torch.randn(3, cols, generator=g, dtype=torch.float64)
    keep = torch.ones(3, cols, dtype=torch.bool)
    keep[:, :3] = False
    coupling = (torch.where(keep, 0.0, w) @ a_bar) * row_weight[:, None]
    assert obc._refined_solve(coupling, a_bar, model, torch.arange(3), keep) is None
    new = w + obc_compensation(w, model, ~keep)
    hessian = torch.block_diag(*[gi * a_bar for gi in row_weight]) + 1e-12 * torch.eye(3 * cols, dtype=torch.float64)
    torch.testing.assert_close(new, constrained_optimum(w, hessian, ~keep), rtol=1e-5, atol=1e-7)
    assert torch.all(new[~keep] == 0)


def test_cg_rows_reach_the_exact_joint_update_within_their_tolerance():
    """Preconditioned CG on every row at once: at the default tolerance the update's loss is within 1e-3 of the
    exact update's (and far from no update); at a tight one it is the exact update to float32 accuracy. Nothing
    moves off the kept set."""
    from fls_hf.pruning.conjugate_gradient import cg_rows

    w, keep, model = wide_row_problem()
    pruned_w = torch.where(keep, 0.0, w)
    coupling = (pruned_w @ model.a_bar()) * model.row_weight[:, None]
    exact = obc_compensation(w, model, ~keep)
    rows = torch.arange(len(w))
    x, converged = cg_rows(coupling, model.a_bar(), model, rows, keep)
    assert converged.all()
    assert torch.all(x[~keep] == 0)
    loss, optimum, untouched = row_loss(x - pruned_w, model), row_loss(exact, model), row_loss(-pruned_w, model)
    assert optimum <= loss <= optimum * (1 + 1e-3) and untouched > 1.5 * optimum
    tight, converged = cg_rows(coupling, model.a_bar(), model, rows, keep, tolerance=1e-5, max_iterations=400)
    assert converged.all()
    torch.testing.assert_close(tight - pruned_w, exact, rtol=0, atol=1e-4 * float(exact.abs().max()))


def test_obc_solve_by_cg_keeps_the_pruned_zeros_exact_and_falls_back_to_the_factorisations():
    """`cg_tolerance` (the `cg` solver): rows where CG is cheaper take it, (W + δW)_P = 0 exactly; rows that cannot
    reach the tolerance (here: none can reach 1e-30 in float32) are solved exactly instead."""
    from fls_hf.pruning import obc

    w, keep, model = wide_row_problem()
    exact, _ = obc.obc_solve(w, model, keep, inverse_diag=False)
    by_cg, _ = obc.obc_solve(w, model, keep, inverse_diag=False, cg_tolerance=3e-3)
    assert torch.all((w + by_cg)[~keep] == 0)
    assert not torch.equal(by_cg, exact)  # CG took the rows: a different rounding of the same update
    assert row_loss(by_cg, model) <= row_loss(exact, model) * (1 + 1e-3)
    fallback, _ = obc.obc_solve(w, model, keep, inverse_diag=False, cg_tolerance=1e-30)
    torch.testing.assert_close(fallback, exact, rtol=1e-9, atol=1e-12)


def test_cg_rows_that_converge_early_leave_the_iteration_with_the_answer_they_had():
    """Rows of mixed difficulty (10 / 50 / 90 % pruned, one with nothing pruned): once a quarter of them has
    converged the others iterate alone; every row's result is that of the row solved by itself (to float32 rounding),
    and a row cut off by `max_iterations` is flagged for the exact solve while the rows that had converged keep their
    answers bit for bit."""
    from fls_hf.pruning.conjugate_gradient import cg_rows

    w, _, model = wide_row_problem(rows=12)
    g = torch.Generator().manual_seed(5)
    sparsity = torch.tensor([0.1] * 4 + [0.5] * 4 + [0.9] * 4)[:, None]
    keep = torch.rand(w.shape, generator=g) >= sparsity
    keep[2] = True  # nothing to compensate: done at x = 0
    pruned_w = torch.where(keep, 0.0, w)
    coupling = (pruned_w @ model.a_bar()) * model.row_weight[:, None]
    rows = torch.arange(len(w))

    def solve(index, **kwargs):
        return cg_rows(coupling[index], model.a_bar(), model, rows[index], keep[index], **kwargs)

    def loss_of_row(i, x):
        delta = torch.zeros_like(w)
        delta[i] = x - pruned_w[i]
        return row_loss(delta, model)

    together, converged = solve(rows)
    assert converged.all() and torch.all(together[2] == 0)
    for i in range(len(w)):
        alone, _ = solve(rows[i : i + 1])
        # float32 rounding differs with the batch (GEMM blocking): a row near its threshold may stop an iteration
        # apart, a step far inside the tolerance (a misplaced row after compaction would be off by O(1))
        torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-2 * float(alone.abs().max()) + 1e-30)
        assert loss_of_row(i, together[i]) == pytest.approx(loss_of_row(i, alone[0]), rel=2e-4)
    # the iteration at which each row converged among the others
    needed = torch.stack([solve(rows, max_iterations=k)[1] for k in range(41)]).int().argmax(dim=0)
    assert needed[2] == 0 and len(set(needed.tolist())) > 3  # the rows do leave at different iterations
    limit = int(needed.max()) - 1
    cut_x, cut = solve(rows, max_iterations=limit)
    assert torch.equal(cut, needed <= limit)
    assert all(torch.equal(cut_x[i], together[i]) for i in range(len(w)) if needed[i] <= limit)

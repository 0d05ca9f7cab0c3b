"""Group OBS for structures (issue 20) against exact OBS with the explicit Hessian blockdiag_i(G_ii (Ā + λI))."""

import pytest
import torch

from fls_hf.pruning.structured import (
    GroupCurve,
    allocate,
    bias_compensation,
    damped_inverse,
    group_compensation,
    group_costs,
    group_removal_curve,
)

DAMPING = 0.05


def layer(rows=5, groups=6, group_size=1, seed=0):
    """W, G_ii, Ā (correlated inputs) of a small consumer layer."""
    gen = torch.Generator().manual_seed(seed)
    cols = groups * group_size
    x = torch.randn(40, cols, generator=gen, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=gen, dtype=torch.float64
    )
    a_bar = x.T @ x / len(x)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    g = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.1
    return w, g, a_bar


def exact_obs(w, g, a_bar, columns):
    """Exact OBS removing every weight in `columns` (all rows) under H = G ⊗ (Ā + λI) (G's diagonal `g` given:
    blockdiag_i(G_ii (Ā + λI))): (cost ½ w_Qᵀ [H⁻¹]_QQ⁻¹ w_Q, new W = W − H⁻¹[:, Q] [H⁻¹]_QQ⁻¹ w_Q)."""
    rows, cols = w.shape
    damped = a_bar + DAMPING * a_bar.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    hessian = torch.kron(g if g.dim() == 2 else torch.diag(g), damped)  # row-major vec(W)
    h_inv = torch.linalg.inv(hessian)
    q = torch.tensor([i * cols + j for i in range(rows) for j in columns])
    wq = w.reshape(-1)[q]
    solved = torch.linalg.solve(h_inv[q][:, q], wq)
    return 0.5 * float(wq @ solved), (w.reshape(-1) - h_inv[:, q] @ solved).reshape(rows, cols)


def full_g(rows, seed):
    """A positive definite output-side factor with strong coupling between rows."""
    m = torch.randn(rows, rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return m @ m.T / rows + 0.05 * torch.eye(rows, dtype=torch.float64)


@pytest.mark.parametrize("output", ["diag", "full"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_group_cost_and_update_equal_exact_obs_over_the_group(group_size, output):
    """Under G ⊗ (Ā + λI), G full or diagonal; the update does not depend on G."""
    w, g, a_bar = layer(group_size=group_size)
    g = g if output == "diag" else full_g(len(w), seed=5)
    h_inv = damped_inverse(a_bar, DAMPING)
    costs = group_costs(w, g, h_inv, group_size)
    for p in range(6):
        columns = list(range(p * group_size, (p + 1) * group_size))
        cost, new = exact_obs(w, g, a_bar, columns)
        assert float(costs[p]) == pytest.approx(cost, rel=1e-9)
        updated = group_compensation(w, h_inv, torch.tensor([p]), group_size)
        torch.testing.assert_close(updated, new, rtol=1e-9, atol=1e-12)
        assert bool((updated[:, columns] == 0).all())


@pytest.mark.parametrize("output", ["diag", "full"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_free_bias_is_eliminated_exactly(group_size, output):
    """Exact OBS over (W, b) under G ⊗ H̃, H̃ = [[Ā + λI, μ], [μᵀ, 1]] (the input [a; 1], the bias undamped), removing
    a group: its cost and W's update are group OBS under Ā − μμᵀ + λI, b's update is −δW μ; a group whose input is
    constant costs only its damping, its mean output moving into the bias."""
    rows, cols = 4, 6 * group_size
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(60, cols, generator=gen, dtype=torch.float64) @ torch.randn(cols, cols, generator=gen).double()
    x = x + 2.0 * torch.randn(cols, generator=gen, dtype=torch.float64)  # inputs with a mean (GELU outputs have one)
    x[:, :group_size] = 1.5  # group 0: a constant input
    a_bar, mean = x.T @ x / len(x), x.mean(0)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    g = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.1
    g = torch.diag(g) if output == "diag" else full_g(rows, seed=5)
    lam = DAMPING * float(a_bar.diagonal().mean())
    augmented = torch.zeros(cols + 1, cols + 1, dtype=torch.float64)
    augmented[:cols, :cols] = a_bar + lam * torch.eye(cols, dtype=torch.float64)
    augmented[:cols, cols] = augmented[cols, :cols] = mean
    augmented[cols, cols] = 1.0
    h_inv_full = torch.linalg.inv(torch.kron(g, augmented))  # vec([W, b]), row-major
    w_aug = torch.cat([w, torch.zeros(rows, 1, dtype=torch.float64)], dim=1)
    h_inv = damped_inverse(a_bar, DAMPING, mean)
    costs = group_costs(w, g if output == "full" else g.diagonal(), h_inv, group_size)
    w0 = w[:, :group_size]  # the constant group: its cost is the damping's alone, ½ λ tr(W_Pᵀ G W_P)
    assert float(costs[0]) == pytest.approx(0.5 * lam * float(torch.trace(w0.T @ g @ w0)), rel=1e-8)
    for p in range(6):
        q = torch.tensor([i * (cols + 1) + j for i in range(rows) for j in range(p * group_size, (p + 1) * group_size)])
        wq = w_aug.reshape(-1)[q]
        solved = torch.linalg.solve(h_inv_full[q][:, q], wq)
        new = (w_aug.reshape(-1) - h_inv_full[:, q] @ solved).reshape(rows, cols + 1)
        assert float(costs[p]) == pytest.approx(0.5 * float(wq @ solved), rel=1e-8, abs=1e-12)
        updated = group_compensation(w, h_inv, torch.tensor([p]), group_size)
        torch.testing.assert_close(updated, new[:, :cols], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(bias_compensation(updated - w, mean), new[:, cols], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("group_size", [1, 3])
def test_full_output_factor_counts_the_rows_coupling_in_costs_and_chunks(group_size):
    """The full G's costs differ from its diagonal's; greedy chunks of two cost exactly what OBS says under it."""
    w, _, a_bar = layer(group_size=group_size, seed=4)
    g = full_g(len(w), seed=5)
    h_inv = damped_inverse(a_bar, DAMPING)
    assert not torch.allclose(group_costs(w, g, h_inv, group_size), group_costs(w, g.diagonal(), h_inv, group_size))
    curve = group_removal_curve(w, g, h_inv, group_size, count=4, chunk=2)
    columns = [j for p in curve.order.tolist() for j in range(p * group_size, (p + 1) * group_size)]
    assert float(curve.costs.sum()) == pytest.approx(exact_obs(w, g, a_bar, sorted(columns))[0], rel=1e-8)


@pytest.mark.parametrize("group_size", [1, 2])
def test_greedy_removal_is_joint_obs_over_the_union_and_cheapest_at_each_step(group_size):
    w, g, a_bar = layer(rows=4, groups=7, group_size=group_size, seed=1)
    h_inv = damped_inverse(a_bar, DAMPING)
    curve = group_removal_curve(w, g, h_inv, group_size, count=4)
    assert len(set(curve.order.tolist())) == 4
    # the sum of the greedy steps' costs is the joint OBS cost of the union, and one joint solve gives the weights
    columns = [j for p in curve.order.tolist() for j in range(p * group_size, (p + 1) * group_size)]
    cost, new = exact_obs(w, g, a_bar, sorted(columns))
    assert float(curve.costs.sum()) == pytest.approx(cost, rel=1e-8)
    torch.testing.assert_close(group_compensation(w, h_inv, curve.order, group_size), new, rtol=1e-8, atol=1e-10)
    # each step removed the group whose joint removal with the earlier ones cost least
    for k in range(4):
        before = [j for p in curve.order[:k].tolist() for j in range(p * group_size, (p + 1) * group_size)]
        base = exact_obs(w, g, a_bar, before)[0] if before else 0.0
        steps = {
            p: exact_obs(w, g, a_bar, sorted(before + list(range(p * group_size, (p + 1) * group_size))))[0] - base
            for p in range(7)
            if p not in curve.order[:k].tolist()
        }
        assert int(curve.order[k]) == min(steps, key=steps.get)
        assert float(curve.costs[k]) == pytest.approx(steps[int(curve.order[k])], rel=1e-7)


def test_greedy_beats_one_shot_ranking_on_correlated_inputs():
    """Two nearly duplicated inputs: OBS removes one and moves its weight onto the twin (a tiny loss); the greedy
    curve reaches a lower loss than removing the same number of groups by their first-step costs."""
    w, g, a_bar = layer(rows=3, groups=6, seed=2)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:, 1] = x[:, 0] + 1e-3 * x[:, 1]
    a_bar = x.T @ x / len(x)
    h_inv = damped_inverse(a_bar, 1e-4)
    curve = group_removal_curve(w, g, h_inv, count=3)
    first = torch.argsort(group_costs(w, g, h_inv, 1))[:3]

    def joint(removed):  # the loss of a removal under H = diag G ⊗ (Ā + λI)
        delta = group_compensation(w, h_inv, removed, 1) - w
        return 0.5 * float(torch.einsum("i,ij,jk,ik->", g, delta, torch.linalg.inv(h_inv), delta))

    assert joint(curve.order) == pytest.approx(float(curve.costs.sum()), rel=1e-8)
    assert joint(curve.order) <= joint(first) + 1e-12


def test_allocation_takes_the_cheapest_prefixes_across_layers():
    curves = {
        "a": GroupCurve(torch.tensor([2, 0, 1]), torch.tensor([1.0, 5.0, 6.0], dtype=torch.float64)),
        "b": GroupCurve(torch.tensor([0, 1, 2]), torch.tensor([2.0, 0.5, 7.0], dtype=torch.float64)),  # cummax 2, 2
    }
    assert allocate(curves, 0) == {"a": 0, "b": 0}
    assert allocate(curves, 3) == {"a": 1, "b": 2}
    assert allocate(curves, 5) == {"a": 3, "b": 2}
    with pytest.raises(ValueError, match="cannot remove 7 groups"):
        allocate(curves, 7)


def test_zero_statistics_and_bad_shapes_are_refused():
    with pytest.raises(Exception, match="Ā are zero"):
        damped_inverse(torch.zeros(3, 3), DAMPING)
    w, g, a_bar = layer()
    with pytest.raises(ValueError, match="groups of 4"):
        group_removal_curve(w, g, damped_inverse(a_bar, DAMPING), group_size=4)


def test_chunked_greedy_steps_are_joint_obs_over_each_chunk():
    """`chunk` groups per step: the removed set's update is still the joint OBS update over the union, and the costs
    add up to its joint loss."""
    w, g, a_bar = layer(rows=4, groups=9, seed=4)
    h_inv = damped_inverse(a_bar, DAMPING)
    curve = group_removal_curve(w, g, h_inv, count=7, chunk=3)  # steps of 3, 3, 1
    assert len(curve.order) == len(set(curve.order.tolist())) == 7
    cost, new = exact_obs(w, g, a_bar, sorted(curve.order.tolist()))
    assert float(curve.costs.sum()) == pytest.approx(cost, rel=1e-8)
    torch.testing.assert_close(group_compensation(w, h_inv, curve.order, 1), new, rtol=1e-8, atol=1e-10)
    assert torch.equal(curve.costs[:3], curve.costs[:1].expand(3))  # one chunk: equal shares


def quadratic_change(w, new, gradient, g, a_bar):
    """The quadratic model's loss change g·δW + ½ vec(δW)ᵀ (G ⊗ (Ā + λI)) vec(δW), explicit Kronecker matrix."""
    cols = w.shape[1]
    damped = a_bar + DAMPING * a_bar.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    hessian = torch.kron(g if g.dim() == 2 else torch.diag(g), damped)
    move = (new - w).reshape(-1)
    return float(gradient.reshape(-1) @ move + 0.5 * move @ hessian @ move)


@pytest.mark.parametrize("output", ["diag", "full"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_first_order_costs_are_the_quadratic_models_change_under_the_obs_update(group_size, output):
    """With a gradient g, each group's cost is g·δW + ½ δWᵀ H δW of its OBS update; a group whose gradient pulls it
    towards zero gets cheaper, one pushed away dearer."""
    w, g, a_bar = layer(group_size=group_size, seed=2)
    g = g if output == "diag" else full_g(len(w), seed=6)
    gradient = torch.randn(w.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    h_inv = damped_inverse(a_bar, DAMPING)
    costs = group_costs(w, g, h_inv, group_size, gradient=gradient)
    plain = group_costs(w, g, h_inv, group_size)
    for p in range(6):
        new = group_compensation(w, h_inv, torch.tensor([p]), group_size)
        assert float(costs[p]) == pytest.approx(quadratic_change(w, new, gradient, g, a_bar), rel=1e-9, abs=1e-12)
    columns = list(range(group_size))  # a gradient along W_P: zeroing W_P moves down it
    towards = torch.zeros_like(w)
    towards[:, columns] = w[:, columns]
    assert float(group_costs(w, g, h_inv, group_size, gradient=towards)[0]) < float(plain[0])
    assert float(group_costs(w, g, h_inv, group_size, gradient=-towards)[0]) > float(plain[0])


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("group_size", [1, 2])
def test_first_order_greedy_costs_sum_to_the_models_change_of_the_final_weights(group_size, chunk):
    """The curve carries the gradient along its moves (g ← g + G δW (Ā + λI)), so the step costs add up to the
    quadratic model's change of the joint OBS weights over the removed union; the order differs from the plain one."""
    w, _, a_bar = layer(group_size=group_size, seed=3)
    g = full_g(len(w), seed=7)
    gradient = 3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h_inv = damped_inverse(a_bar, DAMPING)
    curve = group_removal_curve(w, g, h_inv, group_size, count=4, chunk=chunk, gradient=gradient)
    final = group_compensation(w, h_inv, curve.order, group_size)
    assert float(curve.costs.sum()) == pytest.approx(quadratic_change(w, final, gradient, g, a_bar), rel=1e-8)
    plain = group_removal_curve(w, g, h_inv, group_size, count=4, chunk=chunk)
    assert curve.order.tolist() != plain.order.tolist()

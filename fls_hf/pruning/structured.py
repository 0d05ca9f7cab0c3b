"""Group OBS for structures: remove whole input columns of a layer (FFN neurons, attention heads) and compensate.

A structure is a group P of input columns of a consumer layer W (rows × cols): an FFN neuron is one column of the
down projection, an attention head its `head_dim` columns of the output projection. With the Kronecker Fisher
G ⊗ (Ā + λI) of W (the K-FAC input factor Ā damped by λ, the output-side Fisher G), removing P from every row is
OBS over the group (ZipLM; OBC for structures). H⁻¹ = G⁻¹ ⊗ (Ā + λI)⁻¹, so the block of H⁻¹ on the group is
G⁻¹ ⊗ H⁻¹_PP with H⁻¹ = (Ā + λI)⁻¹ from here on, and

    cost(P) = ½ tr(W_Pᵀ G W_P [H⁻¹_PP]⁻¹),        δW = −W_P [H⁻¹_PP]⁻¹ H⁻¹_P,:      ((W + δW)_:,P = 0).

With diag G the cost is ½ Σ_i G_ii w_iPᵀ [H⁻¹_PP]⁻¹ w_iP; the full G also sees how the rows' outputs interact
downstream (a column along a direction the next LayerNorm removes costs nothing). The update does not depend on G;
the cost does, in loss units, so one threshold ranks groups across layers. Removing groups one at a time
(`group_removal_curve`: the cheapest group, then downdate H⁻¹ ← H⁻¹ − H⁻¹_:,P [H⁻¹_PP]⁻¹ H⁻¹_P,: and update W) is
greedy OBS; the final update for a removed set equals the joint OBS update over their union from the original H⁻¹
(`group_compensation`), so the curve is computed once and the chosen prefix is applied in one solve. The layers that
produce P's inputs (the up / gate rows of a neuron, the q / k / v rows of a head) are removed with no compensation
of their own.

With the mean data-label gradient g of W (`curvature.first_order`), the cost adds the first-order change of the
loss under that same update, g·δW = −Σ_i (W_P [H⁻¹_PP]⁻¹)_i · (H⁻¹_P,: g_iᵀ): a group the loss is pushing towards
zero costs less (movement pruning's signal, Sanh et al. 2020, inside OBS). The update stays the OBS one (no Newton
step on the survivors: training makes that move), and the greedy curve carries the gradient along as the quadratic
model does, g ← g + G δW (Ā + λI), so its costs sum to the model's loss change of the final weights. Pure tensor
maths in float64, no transformers imports.

A consumer with a bias b has the input [a; 1], whose Kronecker factor is [[Ā, μ], [μᵀ, 1]] (μ = E[a], the ones
column K-FAC keeps). The bias is never removed; left free (and undamped) it is eliminated exactly: for any δW its
OBS update is δb = −δW μ (`bias_compensation`), and what remains for W is OBS under the Schur complement
Ā − μμᵀ + λI, the inputs' covariance (`damped_inverse` with `mean`). A group's mean output then goes into the bias at
no cost, so an FFN neuron that is nearly constant over the data is cheap to remove (FLAP's bias compensation, An et
al. 2024, as the OBS optimum). The first-order term takes the bias's own gradient as zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import CurvatureError
from ..model.blocks import group_rows


@dataclass(frozen=True)
class GroupCurve:
    """One layer's greedy removal: `order[k]` is the (k+1)-th group removed, `costs[k]` the loss it added.

    Args:
        order: (n,) int64 group indices.
        costs: (n,) float64, loss units (½ tr(W_Pᵀ G W_P [H⁻¹_PP]⁻¹) at the time of removal).
    """

    order: torch.Tensor
    costs: torch.Tensor


def damped_inverse(a_bar: torch.Tensor, damping: float, mean: torch.Tensor | None = None) -> torch.Tensor:
    """H⁻¹ = (Ā + λI)⁻¹ with λ = `damping` × mean diag Ā (relative, as SparseGPT's dampening): (cols, cols) float64.
    With the inputs' `mean` μ (cols,) (the consumer's bias free, `bias_compensation`): (Ā − μμᵀ + λI)⁻¹."""
    a = a_bar.double()
    scale = float(a.diagonal().mean())
    if not scale > 0:
        raise CurvatureError("the layer's input statistics Ā are zero: no structure can be ranked on them")
    h = a + damping * scale * torch.eye(len(a), dtype=a.dtype, device=a.device)
    if mean is not None:
        mu = mean.to(h)
        h = h - torch.outer(mu, mu)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        what = "Ā + λI" if mean is None else "Ā − μμᵀ + λI"
        raise CurvatureError(f"{what} is not positive definite (λ = {damping} × mean diag Ā); raise the damping")
    return torch.cholesky_inverse(factor)


def bias_compensation(delta: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """δb = −δW μ: the bias's OBS update for a move δW (rows, cols) of the weights whose inputs have mean μ (cols,);
    it keeps every row's mean output where it was. (rows,) float64."""
    return -(delta.double() @ mean.to(device=delta.device, dtype=torch.float64))


def _grouped(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    """Columns (…, cols) as (…, n, group_size)."""
    return matrix.reshape(*matrix.shape[:-1], -1, group_size)


def output_weighted(weight: torch.Tensor, output_factor: torch.Tensor) -> torch.Tensor:
    """G W: `output_factor` is G (rows, rows) or its diagonal (rows,)."""
    g = output_factor.double()
    return g @ weight if g.dim() == 2 else g[:, None] * weight


def group_costs(
    weight: torch.Tensor,
    output_factor: torch.Tensor,
    h_inv: torch.Tensor,
    group_size: int,
    alive: torch.Tensor | None = None,
    gradient: torch.Tensor | None = None,
) -> torch.Tensor:
    """cost(P) = ½ tr(W_Pᵀ G W_P [H⁻¹_PP]⁻¹) (+ g·δW with a `gradient`) for every group of `group_size` consecutive
    columns: (n,); inf for the groups not `alive` (removed: their block of H⁻¹ is zero after the downdates).

    Args:
        output_factor: G, (rows, rows), or diag G, (rows,).
        gradient: (rows, cols) mean gradient g of the loss w.r.t. W, or None (the quadratic cost alone).
    """
    weighted = _grouped(output_weighted(weight.double(), output_factor), group_size)  # G W, (rows, n, g)
    w = _grouped(weight.double(), group_size)  # (rows, n, g)
    n = w.shape[1]
    index = group_rows(torch.arange(n, device=h_inv.device), group_size).view(n, group_size)
    blocks = h_inv[index[:, :, None], index[:, None, :]]  # (n, g, g) diagonal blocks H⁻¹_PP
    if alive is not None:  # removed groups: the identity, so the batched solve stays finite
        eye = torch.eye(group_size, dtype=blocks.dtype, device=blocks.device)
        blocks = torch.where(alive[:, None, None], blocks, eye)
    if group_size == 1:
        solved = w / blocks[:, 0, 0, None]  # [H⁻¹_PP]⁻¹ w_iP, (rows, n, 1)
    else:
        solved = torch.linalg.solve(blocks[None], w.unsqueeze(-1)).squeeze(-1)  # [H⁻¹_PP]⁻¹ w_iP, (rows, n, g)
    costs = 0.5 * torch.einsum("ing,ing->n", weighted, solved)
    if gradient is not None:  # g·δW = −Σ_i solved_iP · (H⁻¹ g_i)_P
        costs = costs - torch.einsum("ing,ing->n", _grouped(gradient.double() @ h_inv, group_size), solved)
    return costs if alive is None else torch.where(alive, costs, torch.inf)


def group_compensation(
    weight: torch.Tensor, h_inv: torch.Tensor, removed: torch.Tensor, group_size: int
) -> torch.Tensor:
    """W + δW for removing the groups `removed` jointly: δW = −W_P [H⁻¹_PP]⁻¹ H⁻¹_P,:, with W_:,P = 0 exactly.

    Args:
        weight: (rows, cols) W.
        h_inv: (cols, cols) (Ā + λI)⁻¹ (`damped_inverse`).
        removed: (k,) int64 indices of groups.

    Returns:
        (rows, cols) float64.
    """
    w = weight.double()
    if removed.numel() == 0:
        return w.clone()
    columns = group_rows(removed, group_size)
    block = h_inv[columns][:, columns]
    coefficients = torch.linalg.solve(block, w[:, columns].T).T  # W_P [H⁻¹_PP]⁻¹, (rows, |P|)
    new = w - coefficients @ h_inv[columns]
    new[:, columns] = 0.0
    return new


def group_removal_curve(
    weight: torch.Tensor,
    output_factor: torch.Tensor,
    h_inv: torch.Tensor,
    group_size: int = 1,
    count: int | None = None,
    chunk: int = 1,
    gradient: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GroupCurve:
    """Greedy group OBS: remove the cheapest group, update W and downdate H⁻¹, until `count` groups are gone (default:
    all but one). `chunk` > 1 removes that many of the currently cheapest groups per step, jointly (their update and
    joint cost are exact OBS; each gets an equal share of the joint cost): `chunk` × fewer steps, each O(cols²).

    Args:
        weight: (rows, cols) W, cols a multiple of `group_size`.
        output_factor: G (rows, rows), positive semi-definite, or diag G (rows,) ≥ 0.
        h_inv: (cols, cols) (Ā + λI)⁻¹.
        gradient: (rows, cols) mean loss gradient g at W, or None: the costs then add g·δW (`group_costs`).
        reduce: FSDP2, where W and diag G are this rank's rows: sums a tensor over the ranks (the costs are sums over
            rows; H⁻¹ is the same everywhere, so every rank makes the same choices).
    """
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"{cols} columns do not split into groups of {group_size}")
    n = cols // group_size
    count = n - 1 if count is None else count
    if not 0 <= count <= n or chunk < 1:
        raise ValueError(f"cannot remove {count} of {n} groups in chunks of {chunk}")
    w, h, g = weight.double().clone(), h_inv.double().clone(), output_factor.double()
    grad = None if gradient is None else gradient.double().clone()
    hessian = None if gradient is None else torch.linalg.inv(h)  # Ā + λI: carries the gradient along the moves
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    order: list[int] = []
    costs: list[float] = []
    total = reduce or (lambda t: t)
    while len(order) < count:
        cost = total(group_costs(w, g, h, group_size, alive, grad))
        take = min(chunk, count - len(order))
        # the cheapest `take` groups, lowest index first on ties (a stable sort of the costs)
        chosen = torch.sort(cost, stable=True).indices[:take]
        columns = group_rows(chosen, group_size)
        block_inv = torch.linalg.inv(h[columns][:, columns])
        coefficients = w[:, columns] @ block_inv  # W_P [H⁻¹_PP]⁻¹
        if take == 1:
            joint = float(cost[chosen[0]])
        else:  # ½ tr(W_Pᵀ G W_P [H⁻¹_PP]⁻¹) + g·δW
            joint_rows = 0.5 * (output_weighted(w[:, columns], g) * coefficients).sum()
            if grad is not None:
                joint_rows = joint_rows - (coefficients * (grad @ h[:, columns])).sum()
            joint = float(total(joint_rows.reshape(1))[0])
        order += chosen.tolist()
        costs += [joint / take] * take
        move = -coefficients @ h[columns]
        move[:, columns] = -w[:, columns]
        w = w + move
        if grad is not None:  # the quadratic model's gradient at the new weights
            grad = grad + output_weighted(move, g) @ hessian
        h = h - h[:, columns] @ block_inv @ h[columns]
        alive[chosen] = False
    device = weight.device
    return GroupCurve(torch.tensor(order, dtype=torch.int64, device=device), torch.tensor(costs, dtype=torch.float64))


def allocate(curves: dict[str, GroupCurve], total: int) -> dict[str, int]:
    """How many groups to remove from each layer: the `total` cheapest greedy steps over all layers, each layer's
    taken as a prefix (its costs made non-decreasing by a running maximum first), ties to the earlier layer name and
    step."""
    entries = []
    for name in sorted(curves):
        running = torch.cummax(curves[name].costs, 0).values.tolist()
        entries += [(cost, name, k) for k, cost in enumerate(running)]
    available = len(entries)
    if not 0 <= total <= available:
        raise ValueError(f"cannot remove {total} groups: the curves hold {available}")
    counts = dict.fromkeys(curves, 0)
    for _, name, _ in sorted(entries)[:total]:
        counts[name] += 1
    return counts

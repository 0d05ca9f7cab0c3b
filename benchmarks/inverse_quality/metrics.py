"""How good a Q is against the exact M⁻¹: relative errors, saliency rank correlation, and the loss after OBS
pruning under Q."""

from __future__ import annotations

import torch

from .problem import Problem, mean_loss

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (continuous values: ties have probability 0)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def saliency(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return w.square() / (2 * q.diagonal())


def obs_prune(q: torch.Tensor, w: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune the lowest-saliency fraction with joint OBS under Q: δ = −Q[:, P](Q_PP)⁻¹ w_P.

    Returns (P, δ, ½ w_Pᵀ(Q_PP)⁻¹w_P)."""
    pruned = saliency(w, q).argsort()[: round(sparsity * len(w))]
    solved = torch.linalg.solve(q[pruned[:, None], pruned[None, :]], w[pruned])
    delta = -q[:, pruned] @ solved
    delta[pruned] = -w[pruned]  # exact analytically; removes rounding
    return pruned, delta, float(0.5 * w[pruned] @ solved)


def pruning_metrics(
    problem: Problem, q: torch.Tensor, exact_masks: dict[float, set[int]] | None
) -> dict[str, dict[str, float]]:
    """Per sparsity: the method's own prediction, ½δᵀFδ, gᵀδ + ½δᵀFδ, the actual loss increase, and the overlap
    with exact OBS's set."""
    out = {}
    for sparsity in SPARSITIES:
        pruned, delta, own = obs_prune(q, problem.w, sparsity)
        quadratic = float(0.5 * delta @ problem.fisher @ delta)
        row = {
            "predicted_self": own,
            "predicted_quadratic": quadratic,
            "predicted_with_gradient": quadratic + float(problem.grad @ delta),
            "actual": mean_loss(problem, problem.w + delta) - problem.loss,
        }
        if exact_masks is not None:
            row["overlap_with_exact"] = len(exact_masks[sparsity] & set(pruned.tolist())) / len(pruned)
        out[f"{sparsity:g}"] = row
    return out


def quality(
    problem: Problem, q: torch.Tensor, exact: torch.Tensor, exact_masks: dict[float, set[int]] | None = None
) -> dict:
    """Relative Frobenius / diagonal error against M⁻¹, saliency rank correlation, pruning outcomes."""
    q = 0.5 * (q + q.T)
    return {
        "rel_fro": float((q - exact).norm() / exact.norm()),
        "rel_diag": float((q.diagonal() - exact.diagonal()).norm() / exact.diagonal().norm()),
        "spearman": spearman(saliency(problem.w, q), saliency(problem.w, exact)),
        "pruning": pruning_metrics(problem, q, exact_masks),
    }


def mean_quality(rows: list[dict]) -> dict:
    """Average of `quality` dicts over repeats (with the standard deviation of the top-level metrics)."""

    def average(values: list) -> object:
        if isinstance(values[0], dict):
            return {k: average([v[k] for v in values]) for k in values[0]}
        return sum(values) / len(values)

    out = average(rows)
    for key in ("rel_fro", "rel_diag", "spearman"):
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        out[f"{key}_std"] = float(values.std()) if len(rows) > 1 else 0.0
    out["repeats"] = len(rows)
    return out

"""Empirical-Fisher inverses (γI + GᵀG/K)⁻¹ from K per-example gradients, data or sampled labels, per structure."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .metrics import mean_quality, quality
from .problem import CLASSES, Problem
from .structures import blockwise_inverse, index_groups


def gradients_at(problem: Problem, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K, P) per-example gradients of the cross-entropy at labels y: J_nᵀ (p_n − e_y)."""
    residual = problem.probs[idx] - nn.functional.one_hot(y, CLASSES).double()
    return torch.einsum("kci,kc->ki", problem.jac[idx], residual)


def sample_gradients(problem: Problem, k: int, labels: str, generator: torch.Generator) -> torch.Tensor:
    """K per-example gradients: examples without replacement while K ≤ N, else with; y the data label
    (`data`) or drawn from the model (`sampled`)."""
    n = problem.jac.shape[0]
    idx = torch.randperm(n, generator=generator)[:k] if k <= n else torch.randint(n, (k,), generator=generator)
    y = (
        problem.data["y"][idx]
        if labels == "data"
        else torch.multinomial(problem.probs[idx], 1, generator=generator).squeeze(1)
    )
    return gradients_at(problem, idx, y)


def empirical_inverses(
    grads: torch.Tensor, gamma: float, shapes: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """(γI + GᵀG/K)⁻¹ dense, and with only the layer / row-block / diagonal blocks of the estimate inverted
    (oBERT, OBD)."""
    m = grads.T @ grads / grads.shape[0] + gamma * torch.eye(grads.shape[1], dtype=torch.float64)
    return {s: blockwise_inverse(m, index_groups(shapes, s)) for s in ("full", "layer", "block_diagonal", "diagonal")}


def empirical_study(
    problem: Problem, gamma: float, exact: torch.Tensor, masks: dict, ks: tuple[int, ...], repeats: int
) -> dict:
    """labels → structure → K → mean quality over `repeats` independent draws."""
    out: dict = {labels: {} for labels in ("data", "sampled")}
    jobs = [(labels, k) for labels in out for k in ks]
    for labels, k in tqdm(jobs, desc=f"empirical Fisher, γ={gamma:g}", leave=False):
        rows: dict[str, list[dict]] = {}
        for repeat in range(repeats):
            generator = torch.Generator().manual_seed(1000 * repeat + k)
            for structure, q in empirical_inverses(
                sample_gradients(problem, k, labels, generator), gamma, problem.shapes
            ).items():
                rows.setdefault(structure, []).append(quality(problem, q, exact, masks))
        for structure, values in rows.items():
            out[labels].setdefault(structure, {})[str(k)] = mean_quality(values)
    return out

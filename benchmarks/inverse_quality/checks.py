"""Cross-checks: our exact float64 quantities agree with the package's (fp32) ones."""

from __future__ import annotations

import torch

from fls_hf.fisher import Categorical, ggn_product, per_example_gradients
from fls_hf.model import resolve_targets

from .empirical import gradients_at
from .problem import Problem


def package_checks(problem: Problem) -> dict[str, float]:
    """Our exact quantities agree with the package's: per-example gradients and the GGN product F·v (fp32 there)."""
    layers = resolve_targets(problem.model, list(problem.shapes))
    batch = {"x": problem.data["x"][:64], "labels": problem.data["y"][:64]}
    grads = next(per_example_gradients(problem.model, [batch], layers, labels="empirical", likelihood=Categorical()))
    ours = gradients_at(problem, torch.arange(64), problem.data["y"][:64])
    theirs = torch.cat([grads[n].reshape(64, -1) for n in problem.shapes], dim=1).double()
    v = torch.randn(len(problem.w), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tangents = {layers[n].weight: t.float() for n, t in zip(problem.shapes, problem.split(v).values())}
    fv = ggn_product(problem.model, {"x": problem.data["x"]}, tangents, Categorical())
    fv = torch.cat([f.reshape(-1) for f in fv]).double()
    return {
        "per_example_gradient_rel_diff": float((ours - theirs).norm() / ours.norm()),
        "ggn_product_rel_diff": float((problem.fisher @ v - fv).norm() / (problem.fisher @ v).norm()),
    }

"""FishLeg Qs built through the package's provider API, refined by aux steps and materialised as dense matrices."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from fls_hf.curvature import config_class_for, provider_class_for
from fls_hf.fisher import Categorical
from fls_hf.model import resolve_targets

from .metrics import quality
from .problem import N_TRAIN, Problem
from .structures import BLOCK

AUX_BATCH, KFAC_EXAMPLES = 128, 256
FISHLEG = [(s, i) for s in ("diagonal", "block_diagonal", "kronecker") for i in ("kfac", "identity")]


def batches_of(data: dict[str, torch.Tensor], count: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` minibatches drawn without replacement within a batch; labels included (FishLeg never uses them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        idx = torch.randperm(N_TRAIN, generator=g)[:size]
        out.append({"x": data["x"][idx], "labels": data["y"][idx]})
    return out


def materialise(provider, problem: Problem) -> torch.Tensor:
    """Dense (P, P) Q from Q·e_q for every unit vector (block-diagonal across layers, as the provider is)."""
    size = len(problem.w)
    q = torch.zeros(size, size, dtype=torch.float64)
    for (name, (rows, cols)), start in zip(problem.shapes.items(), problem.offsets.values()):
        for j in range(rows * cols):
            unit = torch.zeros(rows * cols)
            unit[j] = 1.0
            q[start : start + rows * cols, start + j] = (
                provider.matvec(name, unit.reshape(rows, cols)).reshape(-1).double()
            )
    return q


def fishleg_provider(problem: Problem, structure: str, init: str, gamma: float, aux_lr: float, total_steps: int):
    """FishLeg provider from the registry, warm-started (K-FAC statistics of 256 sampled-label examples, or I/γ)."""
    config = config_class_for("fishleg")(
        damping=gamma,
        structure=structure,
        block_size=BLOCK,
        init=init,
        init_examples=KFAC_EXAMPLES,
        aux_lr=aux_lr,
        aux_lr_schedule="linear",
        warmup_steps=0,
        seed=0,
    )
    layers = resolve_targets(problem.model, list(problem.shapes))
    provider = provider_class_for("fishleg")(layers, config, likelihood=Categorical())
    provider.prepare(problem.model, batches_of(problem.data, 2, KFAC_EXAMPLES // 2, seed=7))  # warm start only
    provider.config.warmup_steps = total_steps  # the linear lr decay (to 0.1 × aux_lr) spans the whole run
    return provider


def fishleg_study(
    problem: Problem,
    gamma: float,
    refs: dict[str, torch.Tensor],
    masks: dict,
    checkpoints: tuple[int, ...],
    aux_lr: float,
) -> dict:
    """structure/init → list of checkpoints: aux steps done, examples seen, seconds, residual, quality, and the
    relative distance to the structure's aux-loss optimum (how far the aux loss is from converged)."""
    out, exact = {}, refs["full/projection"]
    aux_batches = batches_of(problem.data, checkpoints[-1], AUX_BATCH, seed=11)
    for structure, init in tqdm(FISHLEG, desc=f"FishLeg, γ={gamma:g}", leave=False):
        start = time.perf_counter()
        provider = fishleg_provider(problem, structure, init, gamma, aux_lr, checkpoints[-1])
        seconds, done, rows, diagnostics = time.perf_counter() - start, 0, [], {}
        for steps in checkpoints:
            start = time.perf_counter()
            if steps > done:
                diagnostics = provider.refine(problem.model, aux_batches[done:steps], steps - done)
            seconds += time.perf_counter() - start
            done = steps
            q = materialise(provider, problem)
            optimum = refs.get(f"{structure}/aux_optimum")
            rows.append(
                {
                    "aux_steps": steps,
                    "examples_seen": steps * AUX_BATCH,
                    "seconds": seconds,
                    "residual": diagnostics.get("residual"),
                    **quality(problem, q, exact, masks),
                    "rel_fro_to_aux_optimum": None if optimum is None else float((q - optimum).norm() / optimum.norm()),
                }
            )
        out[f"{structure}/{init}"] = rows
    return out

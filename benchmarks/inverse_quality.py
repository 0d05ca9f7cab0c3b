"""B4 / issue 6: how good is the inverse Fisher? FishLeg's Q against empirical-Fisher inverses and the exact one.

On a small MLP classifier (16 → 32 → 6, tanh, 704 prunable weights) trained briefly on a synthetic task, the
true Fisher over the weights, F = E_x[Jᵀ (diag p − ppᵀ) J], is computed exactly from per-example Jacobians
(float64, torch.func), so the exact damped inverse M⁻¹ = (F + γI)⁻¹ is known. Compared with it:

- empirical-Fisher inverses (γI + (1/K) Σ_k g_k g_kᵀ)⁻¹ from K per-example gradients (K = 1 … 10⁴, data labels
  as oBERT uses, or labels sampled from the model, the unbiased Monte-Carlo true Fisher), dense and
  restricted to the layer / within-row block / diagonal structure (blocks of the estimate inverted);
- FishLeg Qs built through the package's provider API (`diagonal`, `block_diagonal`, `kronecker`; `kfac` and
  `identity` starts) after 0 … N aux steps on minibatches, materialised by matvecs with unit vectors;
- structural references: the exact inverse projected onto each structure (its entries kept, the others 0)
  and the aux-loss optimum of each structure ((F + γI) inverted block by block, what FishLeg converges to
  with Gaussian u); for Kronecker, the nearest R ⊗ L to each layer's block of M⁻¹ (Van Loan–Pitsianis).

Metrics: relative Frobenius error of Q and of diag Q, Spearman correlation of OBS saliencies w²/(2 Q_qq)
with the exact ones, and for 10–50 % of the weights pruned by each method's saliency (global) with joint OBS
compensation under its own Q, δ = −Q[:, P] (Q_PP)⁻¹ w_P: the loss increase it predicts, the quadratic model
½ δᵀFδ (also + gᵀδ) and the actual increase of the training loss. Writes JSON and a PNG.

    python benchmarks/inverse_quality.py            # ≈ 5 min on 2 CPU cores → results/inverse_quality.json (+ .png)
    python benchmarks/inverse_quality.py --quick    # ≈ 20 s → results/inverse_quality_quick.json
    python benchmarks/inverse_quality.py --aux_lr 3e-3 --output benchmarks/results/inverse_quality_lr3e-3.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from fls_hf.curvature import config_class_for, provider_class_for
from fls_hf.fisher.products import ggn_product
from fls_hf.fisher.gradients import per_example_gradients
from fls_hf.fisher.likelihoods import Categorical
from fls_hf.progress import progress
from fls_hf.model.targets import resolve_targets

RESULTS = Path(__file__).parent / "results"
D_IN, HIDDEN, CLASSES, N_TRAIN, N_TEST = 16, 32, 6, 2048, 2048
TRAIN_STEPS, TRAIN_LR = 400, 1e-2
DAMPINGS = (1e-4, 1e-2)
BLOCK = 16  # within-row block size of the block_diagonal structures (divides both layers' widths, 16 and 32)
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5)
AUX_BATCH, KFAC_EXAMPLES = 128, 256
FISHLEG = [(s, i) for s in ("diagonal", "block_diagonal", "kronecker") for i in ("kfac", "identity")]
SETTINGS = {
    "full": {"ks": (1, 10, 100, 1000, 10000), "repeats": 3, "checkpoints": (0, 100, 300, 1000, 3000, 6000)},
    "quick": {"ks": (1, 100, 10000), "repeats": 1, "checkpoints": (0, 20, 60)},
}


# ----------------------------------------------------------------------------- the problem
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Correlated Gaussian inputs, labels drawn from a random tanh teacher's softmax (noisy, non-linear)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))
    scales = torch.logspace(0, -1.5, D_IN)  # input covariance spectrum 1 … 1e-3: a strongly non-diagonal Fisher
    w1 = torch.randn(D_IN, 24, generator=g) * 3 / math.sqrt(D_IN)
    w2 = torch.randn(24, CLASSES, generator=g) * 3 / math.sqrt(24)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, D_IN, generator=g) * scales @ basis.T
        probs = torch.softmax(2.5 * torch.tanh(x @ w1) @ w2, dim=-1)
        return x, torch.multinomial(probs, 1, generator=g).squeeze(1)

    (x, y), (x_test, y_test) = draw(N_TRAIN), draw(N_TEST)
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def train_mlp(data: dict[str, torch.Tensor], seed: int = 0) -> MLP:
    """Full-batch Adam for TRAIN_STEPS steps: a trained but not converged model (gradient ≠ 0)."""
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    for _ in range(TRAIN_STEPS):
        loss = nn.functional.cross_entropy(model(data["x"]), data["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@dataclass
class Problem:
    """Everything exact, in float64; weight vectors are fc1.weight then fc2.weight, row-major."""

    model: MLP
    data: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]  # layer name → (rows, cols), in weight-vector order
    params: dict[str, torch.Tensor]  # float64 copies of every model parameter
    w: torch.Tensor  # (P,) the prunable weights
    jac: torch.Tensor  # (N, C, P) per-example Jacobians of the logits
    probs: torch.Tensor  # (N, C)
    fisher: torch.Tensor  # (P, P)
    grad: torch.Tensor  # (P,) gradient of the mean training loss
    loss: float

    @property
    def offsets(self) -> dict[str, int]:
        out, start = {}, 0
        for name, (rows, cols) in self.shapes.items():
            out[name] = start
            start += rows * cols
        return out

    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """(P,) → {"<layer>.weight": (rows, cols)}."""
        return {f"{n}.weight": vector[o : o + r * c].reshape(r, c) for (n, (r, c)), o in zip(self.shapes.items(), self.offsets.values())}


def logits_at(problem: Problem, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(problem.model, {**problem.params, **weights}, (x,))


def mean_loss(problem: Problem, w: torch.Tensor) -> float:
    logits = logits_at(problem, problem.split(w), problem.data["x"].double())
    return float(nn.functional.cross_entropy(logits, problem.data["y"]))


def build_problem(data: dict[str, torch.Tensor], model: MLP) -> Problem:
    """Per-example Jacobians (vmap of jacrev), the exact Fisher E[Jᵀ(diag p − ppᵀ)J] and the loss gradient."""
    shapes = {"fc1": (HIDDEN, D_IN), "fc2": (CLASSES, HIDDEN)}
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    weights = {f"{n}.weight": params[f"{n}.weight"] for n in shapes}
    x = data["x"].double()

    def logits(ws: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, **ws}, (xi,))

    per_param = vmap(jacrev(logits), in_dims=(None, 0))(weights, x)
    jac = torch.cat([per_param[k].reshape(x.shape[0], CLASSES, -1) for k in weights], dim=-1)
    probs = torch.softmax(logits(weights, x), dim=-1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    fisher = torch.einsum("nci,ncd,ndj->ij", jac, h_out, jac) / x.shape[0]
    residual = probs - nn.functional.one_hot(data["y"], CLASSES).double()
    grad = torch.einsum("nci,nc->i", jac, residual) / x.shape[0]
    w = torch.cat([v.reshape(-1) for v in weights.values()])
    problem = Problem(model, data, shapes, params, w, jac, probs, 0.5 * (fisher + fisher.T), grad, 0.0)
    problem.loss = mean_loss(problem, w)
    return problem


# ----------------------------------------------------------------------------- structures
def index_groups(shapes: dict[str, tuple[int, int]], structure: str) -> list[torch.Tensor]:
    """Partition of the weight indices: one group (full), per layer, per within-row block of BLOCK, or singletons."""
    groups, start = [], 0
    for rows, cols in shapes.values():
        idx = torch.arange(start, start + rows * cols)
        start += rows * cols
        if structure == "layer":
            groups.append(idx)
        elif structure == "block_diagonal":
            groups.extend(idx.reshape(rows, -1, BLOCK).reshape(-1, BLOCK))
        elif structure == "diagonal":
            groups.extend(idx.reshape(-1, 1))
    return [torch.arange(start)] if structure == "full" else groups


def blockwise_inverse(matrix: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Dense matrix whose group blocks are the inverses of `matrix`'s blocks (0 between groups)."""
    out = torch.zeros_like(matrix)
    for idx in groups:
        out[idx[:, None], idx[None, :]] = torch.linalg.inv(matrix[idx[:, None], idx[None, :]])
    return out


def projection(matrix: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """`matrix` with its entries between different groups set to 0 (the Frobenius-nearest of that structure)."""
    out = torch.zeros_like(matrix)
    for idx in groups:
        out[idx[:, None], idx[None, :]] = matrix[idx[:, None], idx[None, :]]
    return out


def nearest_kronecker(matrix: torch.Tensor, shapes: dict[str, tuple[int, int]]) -> torch.Tensor:
    """Per layer, the Frobenius-nearest B ⊗ C (rows² ⊗ cols², row-major weights) by a rank-1 SVD (Van Loan–Pitsianis)."""
    out, start = torch.zeros_like(matrix), 0
    for rows, cols in shapes.values():
        n = rows * cols
        block = matrix[start : start + n, start : start + n]
        rearranged = block.reshape(rows, cols, rows, cols).permute(0, 2, 1, 3).reshape(rows * rows, cols * cols)
        u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
        left, right = (s[0].sqrt() * u[:, 0]).reshape(rows, rows), (s[0].sqrt() * vh[0]).reshape(cols, cols)
        out[start : start + n, start : start + n] = torch.kron(left, right)
        start += n
    return out


def references(problem: Problem, gamma: float) -> dict[str, torch.Tensor]:
    """Per structure: M⁻¹ projected on it (the Frobenius-nearest Q of that structure) and its aux-loss optimum
    (the blocks of M inverted: the OBS-optimal Q when compensation stays inside the blocks)."""
    m = problem.fisher + gamma * torch.eye(len(problem.w), dtype=torch.float64)
    exact = torch.linalg.inv(m)
    out = {}
    for structure in ("full", "layer", "block_diagonal", "diagonal"):
        groups = index_groups(problem.shapes, structure)
        out[f"{structure}/projection"] = projection(exact, groups)
        out[f"{structure}/aux_optimum"] = blockwise_inverse(m, groups)
    out["kronecker/nearest_kronecker"] = nearest_kronecker(exact, problem.shapes)
    return out


# ----------------------------------------------------------------------------- metrics
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (continuous values: ties have probability 0)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def saliency(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return w.square() / (2 * q.diagonal())


def obs_prune(q: torch.Tensor, w: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune the lowest-saliency fraction with joint OBS under Q: δ = −Q[:, P](Q_PP)⁻¹ w_P; returns (P, δ, ½ w_Pᵀ(Q_PP)⁻¹w_P)."""
    pruned = saliency(w, q).argsort()[: round(sparsity * len(w))]
    solved = torch.linalg.solve(q[pruned[:, None], pruned[None, :]], w[pruned])
    delta = -q[:, pruned] @ solved
    delta[pruned] = -w[pruned]  # exact analytically; removes rounding
    return pruned, delta, float(0.5 * w[pruned] @ solved)


def pruning_metrics(problem: Problem, q: torch.Tensor, exact_masks: dict[float, set[int]] | None) -> dict[str, dict[str, float]]:
    """Per sparsity: the method's own prediction, ½δᵀFδ, gᵀδ + ½δᵀFδ, the actual loss increase, overlap with exact OBS's set."""
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


def quality(problem: Problem, q: torch.Tensor, exact: torch.Tensor, exact_masks: dict[float, set[int]] | None = None) -> dict:
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


# ----------------------------------------------------------------------------- empirical Fisher
def gradients_at(problem: Problem, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K, P) per-example gradients of the cross-entropy at labels y: J_nᵀ (p_n − e_y)."""
    residual = problem.probs[idx] - nn.functional.one_hot(y, CLASSES).double()
    return torch.einsum("kci,kc->ki", problem.jac[idx], residual)


def sample_gradients(problem: Problem, k: int, labels: str, generator: torch.Generator) -> torch.Tensor:
    """K per-example gradients: examples without replacement while K ≤ N, else with; y the data label
    (`data`) or drawn from the model (`sampled`)."""
    n = problem.jac.shape[0]
    idx = torch.randperm(n, generator=generator)[:k] if k <= n else torch.randint(n, (k,), generator=generator)
    y = problem.data["y"][idx] if labels == "data" else torch.multinomial(problem.probs[idx], 1, generator=generator).squeeze(1)
    return gradients_at(problem, idx, y)


def empirical_inverses(grads: torch.Tensor, gamma: float, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """(γI + GᵀG/K)⁻¹ dense, and with only the layer / row-block / diagonal blocks of the estimate inverted (oBERT, OBD)."""
    m = grads.T @ grads / grads.shape[0] + gamma * torch.eye(grads.shape[1], dtype=torch.float64)
    return {s: blockwise_inverse(m, index_groups(shapes, s)) for s in ("full", "layer", "block_diagonal", "diagonal")}


def empirical_study(problem: Problem, gamma: float, exact: torch.Tensor, masks: dict, ks: tuple[int, ...], repeats: int) -> dict:
    """labels → structure → K → mean quality over `repeats` independent draws."""
    out: dict = {labels: {} for labels in ("data", "sampled")}
    jobs = [(labels, k) for labels in out for k in ks]
    for labels, k in progress(jobs, total=len(jobs), desc=f"empirical Fisher, γ={gamma:g}"):
        rows: dict[str, list[dict]] = {}
        for repeat in range(repeats):
            generator = torch.Generator().manual_seed(1000 * repeat + k)
            for structure, q in empirical_inverses(sample_gradients(problem, k, labels, generator), gamma, problem.shapes).items():
                rows.setdefault(structure, []).append(quality(problem, q, exact, masks))
        for structure, values in rows.items():
            out[labels].setdefault(structure, {})[str(k)] = mean_quality(values)
    return out


# ----------------------------------------------------------------------------- FishLeg through the package
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
            q[start : start + rows * cols, start + j] = provider.matvec(name, unit.reshape(rows, cols)).reshape(-1).double()
    return q


def fishleg_provider(problem: Problem, structure: str, init: str, gamma: float, aux_lr: float, total_steps: int):
    """FishLeg provider from the registry, warm-started (K-FAC statistics of 256 sampled-label examples, or I/γ)."""
    config = config_class_for("fishleg")(
        damping=gamma, structure=structure, block_size=BLOCK, init=init, init_examples=KFAC_EXAMPLES,
        aux_lr=aux_lr, aux_lr_schedule="linear", warmup_steps=0, seed=0,
    )
    layers = resolve_targets(problem.model, list(problem.shapes))
    provider = provider_class_for("fishleg")(layers, config, likelihood=Categorical())
    provider.prepare(problem.model, batches_of(problem.data, 2, KFAC_EXAMPLES // 2, seed=7))  # warm start only
    provider.config.warmup_steps = total_steps  # the linear lr decay (to 0.1 × aux_lr) spans the whole run
    return provider


def fishleg_study(problem: Problem, gamma: float, refs: dict[str, torch.Tensor], masks: dict, checkpoints: tuple[int, ...],
                  aux_lr: float) -> dict:
    """structure/init → list of checkpoints: aux steps done, examples seen, seconds, residual, quality, and the
    relative distance to the structure's aux-loss optimum (how far the aux loss is from converged)."""
    out, exact = {}, refs["full/projection"]
    aux_batches = batches_of(problem.data, checkpoints[-1], AUX_BATCH, seed=11)
    for structure, init in progress(FISHLEG, total=len(FISHLEG), desc=f"FishLeg, γ={gamma:g}"):
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
            rows.append({"aux_steps": steps, "examples_seen": steps * AUX_BATCH, "seconds": seconds,
                         "residual": diagnostics.get("residual"), **quality(problem, q, exact, masks),
                         "rel_fro_to_aux_optimum": None if optimum is None else float((q - optimum).norm() / optimum.norm())})
        out[f"{structure}/{init}"] = rows
    return out


# ----------------------------------------------------------------------------- cross-checks with the package
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


# ----------------------------------------------------------------------------- report
def describe(problem: Problem) -> dict:
    def accuracy_loss(x, y):
        with torch.no_grad():
            logits = problem.model(x)
        return float((logits.argmax(1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))

    eig = torch.linalg.eigvalsh(problem.fisher)
    train_acc, train_loss = accuracy_loss(problem.data["x"], problem.data["y"])
    test_acc, test_loss = accuracy_loss(problem.data["x_test"], problem.data["y_test"])
    return {
        "model": f"MLP {D_IN}-{HIDDEN}-{CLASSES} (tanh, biases not pruned), {len(problem.w)} prunable weights",
        "data": f"{N_TRAIN} train / {N_TEST} test examples, labels drawn from a random tanh teacher's softmax",
        "train_steps": TRAIN_STEPS, "train_accuracy": train_acc, "train_loss": train_loss,
        "test_accuracy": test_acc, "test_loss": test_loss, "grad_norm": float(problem.grad.norm()),
        "fisher_eigenvalues": {f"q{int(100 * q)}": float(eig[round(q * (len(eig) - 1))]) for q in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)},
        "fisher_mean_diagonal": float(problem.fisher.diagonal().mean()),
    }


def plot(results: dict, path: Path) -> None:
    """Per damping, vs K (empirical Fisher; FishLeg's last checkpoint as horizontal lines): rel. Frobenius error,
    saliency Spearman, and the actual loss increase after pruning 50 % with joint OBS (exact OBS in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dampings = results["dampings"]
    panels = (("rel_fro", "‖Q − M⁻¹‖ / ‖M⁻¹‖"), ("spearman", "Spearman ρ of OBS saliencies"), ("loss50", "loss increase, 50 % pruned"))
    fig, axes = plt.subplots(len(dampings), 3, figsize=(15, 4.0 * len(dampings) + 1.6), squeeze=False)
    colors = {"full": "black", "block_diagonal": "tab:blue", "diagonal": "tab:orange", "kronecker": "tab:green"}

    def value(m: dict, metric: str) -> float:
        return m["pruning"]["0.5"]["actual"] if metric == "loss50" else m[metric]

    for row, (gamma, res) in zip(axes, dampings.items()):
        for ax, (metric, label) in zip(row, panels):
            for labels, style in (("data", "-"), ("sampled", "--")):
                for structure in ("full", "block_diagonal", "diagonal"):
                    series = res["empirical"][labels][structure]
                    ax.plot([int(k) for k in series], [value(m, metric) for m in series.values()], style, marker="o", ms=3,
                            color=colors[structure], label=f"empirical Fisher, {structure}, {labels} labels")
            for key, rows in res["fishleg"].items():
                structure, init = key.split("/")
                ax.axhline(value(rows[-1], metric), color=colors[structure], linestyle=":" if init == "identity" else "-.",
                           lw=1.6, label=f"FishLeg {key} after {rows[-1]['aux_steps']} aux steps")
            if metric == "loss50":
                ax.axhline(value(res["exact"], metric), color="grey", lw=3, alpha=0.5, label="exact (F + γI)⁻¹")
            ax.set_xscale("log")
            if metric != "spearman":
                ax.set_yscale("log")
            ax.set_xlabel("K (per-example gradients)")
            ax.set_ylabel(label)
            ax.set_title(f"γ = {gamma}")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    fig.suptitle(f"Inverse-Fisher quality on a {results['setup']['model']}")
    fig.tight_layout(rect=(0, 1.1 / (4.0 * len(dampings) + 1.6), 1, 1))
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer K values, one repeat, few aux steps (smoke run)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/inverse_quality[_quick].json)")
    parser.add_argument("--aux_lr", type=float, default=1e-2, help="FishLeg's Adam learning rate (the package default is 1e-2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = SETTINGS["quick" if args.quick else "full"]
    output = args.output or RESULTS / ("inverse_quality_quick.json" if args.quick else "inverse_quality.json")
    began = time.perf_counter()

    data = make_data()
    problem = build_problem(data, train_mlp(data))
    results = {
        "command": " ".join(["python", "benchmarks/inverse_quality.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
        "setup": {**describe(problem), "dampings": list(DAMPINGS), "ks": list(settings["ks"]), "repeats": settings["repeats"],
                  "aux_checkpoints": list(settings["checkpoints"]), "aux_batch": AUX_BATCH, "aux_lr": args.aux_lr,
                  "aux_lr_schedule": "linear to 0.1 × over the run", "kfac_examples": KFAC_EXAMPLES, "block_size": BLOCK,
                  "sparsities": list(SPARSITIES)},
        "checks": package_checks(problem),
        "dampings": {},
    }
    for gamma in DAMPINGS:
        refs = references(problem, gamma)
        exact = refs["full/projection"]
        masks = {s: set(obs_prune(exact, problem.w, s)[0].tolist()) for s in SPARSITIES}
        results["dampings"][f"{gamma:g}"] = {
            "exact": quality(problem, exact, exact, masks),
            "magnitude": quality(problem, torch.eye(len(problem.w), dtype=torch.float64) / gamma, exact, masks),
            "references": {k: quality(problem, q, exact, masks) for k, q in refs.items()},
            "empirical": empirical_study(problem, gamma, exact, masks, settings["ks"], settings["repeats"]),
            "fishleg": fishleg_study(problem, gamma, refs, masks, settings["checkpoints"], args.aux_lr),
        }
    results["seconds"] = time.perf_counter() - began

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))
    print(f"wrote {output} in {results['seconds']:.0f} s")
    try:
        plot(results, output.with_suffix(".png"))
        print(f"wrote {output.with_suffix('.png')}")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")


def summary(results: dict) -> str:
    """The README's Markdown table per damping (a selection of the JSON's rows)."""
    setup, lines = results["setup"], []
    last = setup["aux_checkpoints"][-1]
    for gamma, res in results["dampings"].items():
        lines += [f"\nγ = {gamma}\n", "| Q | examples | ‖Q − M⁻¹‖/‖M⁻¹‖ | diag error | Spearman ρ | overlap 50 % | "
                  "Δloss 30 %: own / ½δᵀFδ / actual | Δloss 50 % actual |", "|---|---|---|---|---|---|---|---|"]

        def row(label: str, examples: str, m: dict) -> None:
            p30, p50 = m["pruning"]["0.3"], m["pruning"]["0.5"]
            lines.append(f"| {label} | {examples} | {m['rel_fro']:.3f} | {m['rel_diag']:.3f} | {m['spearman']:.3f} | "
                         f"{p50.get('overlap_with_exact', 1.0):.2f} | {p30['predicted_self']:.4f} / {p30['predicted_quadratic']:.4f} / "
                         f"{p30['actual']:.4f} | {p50['actual']:.4f} |")

        row("exact (F + γI)⁻¹", "all (exact)", res["exact"])
        row("magnitude I/γ", "0", res["magnitude"])
        emp = res["empirical"]
        for labels, structure, ks in (("sampled", "full", ("100", "1000", "10000")), ("data", "full", ("1000", "10000")),
                                      ("sampled", "layer", ("10000",)), ("sampled", "block_diagonal", ("100", "10000")),
                                      ("sampled", "diagonal", ("100", "10000"))):
            for k in (k for k in ks if k in emp[labels][structure]):
                row(f"empirical {structure}, {labels} labels", f"{int(k):,} gradients", emp[labels][structure][k])
        for key in ("layer/aux_optimum", "block_diagonal/projection", "block_diagonal/aux_optimum", "diagonal/projection",
                    "diagonal/aux_optimum", "kronecker/nearest_kronecker"):
            structure, kind = key.split("/")
            label = {"projection": "M⁻¹ projected on", "aux_optimum": "aux-loss optimum,", "nearest_kronecker": "nearest R ⊗ L to M⁻¹,"}[kind]
            row(f"{label} {structure}", "all (exact)", res["references"][key])
        for key, rows in res["fishleg"].items():
            picked = rows if key.endswith("kfac") else rows[-1:]
            for m in (m for m in picked if m["aux_steps"] in (0, 1000, last)):
                examples = (KFAC_EXAMPLES if key.endswith("kfac") else 0) + m["examples_seen"]
                row(f"FishLeg {key}, {m['aux_steps']:,} aux steps", f"{examples:,} GGN", m)
    return "\n".join(lines)


if __name__ == "__main__":
    main()

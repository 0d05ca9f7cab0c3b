"""Every pruning rule against exact greedy OBS on a net small enough for its exact Fisher (issue 17's table).

A 64-32-10 tanh MLP without biases (2,368 weights) trained on sklearn's digits for 6 epochs (training loss about
0.09). Its exact (expected-label) Fisher over the training set, in float64, M = F + γI (γ = 1e-5), gives the
reference: greedy OBS on the full M, removing the least salient weight, compensating with the full column of M⁻¹
and downdating M⁻¹, one weight at a time. Each fls_hf rule prunes a copy of the dense net one-shot (global ranking,
calibration = the training set); the table is the rise in training loss, lower is better.

    python -m benchmarks.exact_fisher                 # full: 30 / 50 / 70 %, writes results/exact_fisher.json
    python -m benchmarks.exact_fisher --quick         # smaller net and data, 50 % only (CI smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from fls_hf import oneshot

from .common.paths import RESULTS

GAMMA = 1e-5
SPARSITIES = (0.3, 0.5, 0.7)
# name → recipe (method + settings); every rule prunes the two Linear layers globally, one-shot.
RULES = {
    "magnitude": {"pruning": {"method": "magnitude", "compensation": "none"}},
    "obd (diagonal Fisher, 256 gradients)": {
        "pruning": {"method": "diagonal_fisher", "compensation": "none"},
        "curvature": {"num_grads": 256, "fisher_labels": "sampled"},
    },
    "oBERT-style block OBS (B = 32)": {
        "pruning": {"method": "block_fisher", "obs_block_size": 32},
        "curvature": {"num_grads": 1024, "block_size": 32, "fisher_labels": "sampled"},
    },
    "fishleg diagonal Q (the package default before issue 17)": {"pruning": {"method": "fishleg"}},
    "fls_hf package default (kfac + row-wise OBC, relative γ 1e-2, 256 examples)": {
        "pruning": {},
        "curvature": {"damping": 1e-2},
    },
    "kfac + row-wise OBC": {
        "pruning": {"method": "kfac", "compensation": "obc"},
        "curvature": {"num_examples": 4096, "damping_mode": "absolute"},
    },
    "kfac + row-wise OBC, 4 stages": {
        "pruning": {"method": "kfac", "compensation": "obc", "recomputations": 4},
        "curvature": {"num_examples": 4096, "damping_mode": "absolute"},
    },
    "kfac + row-wise OBC, 4 rounds": {
        "pruning": {"method": "kfac", "compensation": "obc", "obc_rounds": 4},
        "curvature": {"num_examples": 4096, "damping_mode": "absolute"},
    },
    "kfac + row-wise OBC, 16 rounds": {
        "pruning": {"method": "kfac", "compensation": "obc", "obc_rounds": 16},
        "curvature": {"num_examples": 4096, "damping_mode": "absolute"},
    },
    "kfac + row-wise OBC, 4 stages × 4 rounds": {
        "pruning": {"method": "kfac", "compensation": "obc", "recomputations": 4, "obc_rounds": 4},
        "curvature": {"num_examples": 4096, "damping_mode": "absolute"},
    },
    # the sweep solver (SparseGPT's column sweep, one factor per layer): cost against accuracy (issue 18)
    "kfac + row-wise OBC, sweep solver": {
        "pruning": {"method": "kfac", "compensation": "obc", "obc_solver": "sweep"},
        "curvature": {"num_examples": 4096, "damping_mode": "absolute"},
    },
    "kfac + row-wise OBC, sweep solver, 4 rounds": {
        "pruning": {"method": "kfac", "compensation": "obc", "obc_solver": "sweep", "obc_rounds": 4},
        "curvature": {"num_examples": 4096, "damping_mode": "absolute"},
    },
    # FishLeg in the same rule: the learned Kronecker Q's within-row blocks of Q⁻¹ as the row model (issue 17)
    "fishleg Kronecker Q, K-FAC start + row-wise OBC": {
        "pruning": {"method": "fishleg", "compensation": "obc"},
        "curvature": {"structure": "kronecker", "init_examples": 4096, "warmup_steps": 0},
    },
    "fishleg Kronecker Q, 1,000 aux steps (lr 1e-2 decayed) + row-wise OBC": {
        "pruning": {"method": "fishleg", "compensation": "obc"},
        "curvature": {
            "structure": "kronecker",
            "init_examples": 4096,
            "warmup_steps": 1000,
            "aux_lr": 1e-2,
            "aux_lr_schedule": "linear",
        },
    },
    "kfac + block OBS (B = 32)": {
        "pruning": {"method": "kfac", "compensation": "block", "obs_block_size": 32},
        "curvature": {"num_examples": 4096, "damping_mode": "absolute"},
    },
}


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def digits(limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return (x[:limit], y[:limit]) if limit else (x, y)


def train(model: MLP, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def exact_fisher(model: MLP, x: torch.Tensor) -> torch.Tensor:
    """F = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n over vec of all weights (row-major, layer order), float64."""
    double = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in double.named_parameters()}

    def logits(flat: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(double, flat, (xi[None],))[0]

    fisher = 0
    for chunk in x.double().split(256):
        jac = torch.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params, chunk)
        j = torch.cat([jac[n].reshape(len(chunk), jac[n].shape[1], -1) for n in params], dim=-1)  # (b, C, P)
        with torch.no_grad():
            p = torch.softmax(double(chunk), dim=-1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        fisher = fisher + torch.einsum("bcp,bcd,bdq->pq", j, h, j)
    return fisher / len(x)


def greedy_obs(w: torch.Tensor, m_inv: torch.Tensor, count: int) -> torch.Tensor:
    """Remove `count` weights one at a time: ρ_q = w_q² / (2 [M⁻¹]_qq) over the survivors, δ = −w_q M⁻¹[:, q] /
    [M⁻¹]_qq, then M⁻¹ ← M⁻¹ − M⁻¹[:, q] M⁻¹[q, :] / [M⁻¹]_qq (the inverse restricted to the survivors)."""
    w, m_inv = w.clone(), m_inv.clone()
    alive = torch.ones(len(w), dtype=torch.bool)
    for _ in range(count):
        saliency = torch.where(alive, w.square() / (2 * m_inv.diagonal()), torch.inf)
        q = int(saliency.argmin())
        column = m_inv[:, q].clone()
        w -= w[q] / column[q] * column
        w[q] = 0.0
        m_inv -= torch.outer(column, column) / column[q]
        alive[q] = False
        m_inv[q, :] = 0.0
        m_inv[:, q] = 0.0
        m_inv[q, q] = 1.0  # keeps the diagonal positive; q is never chosen again
    w[~alive] = 0.0
    return w


def set_flat(model: MLP, flat: torch.Tensor) -> None:
    start = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[start : start + p.numel()].view_as(p).float())
            start += p.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small net, 400 examples, 50 %% only")
    parser.add_argument("--output", default=str(RESULTS / "exact_fisher.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    sizes, limit, epochs, sparsities = (
        ((64, 16, 10), 400, 30, (0.5,)) if args.quick else ((64, 32, 10), None, 6, SPARSITIES)
    )
    x, y = digits(limit)
    torch.manual_seed(0)
    dense = MLP(sizes)
    train(dense, x, y, epochs)
    dense_loss = loss(dense, x, y)
    batches = [{"x": xb} for xb in x.split(64)]
    flat = torch.cat([p.detach().reshape(-1).double() for p in dense.parameters()])
    started = time.time()
    m_inv = torch.linalg.inv(exact_fisher(dense, x) + GAMMA * torch.eye(len(flat), dtype=torch.float64))
    rows = {"exact greedy OBS (full M)": {}}
    for s in sparsities:
        model = copy.deepcopy(dense)
        set_flat(model, greedy_obs(flat, m_inv, round(s * len(flat))))
        rows["exact greedy OBS (full M)"][str(s)] = loss(model, x, y) - dense_loss
    print(f"exact Fisher and greedy OBS: {time.time() - started:.0f} s", flush=True)
    for name, recipe in RULES.items():
        if args.quick and recipe.get("curvature", {}).get("warmup_steps", 0) > 100:
            continue  # a smoke run exercises every rule's pipeline; the long FishLeg runs only cost time there
        rows[name] = {}
        for s in sparsities:
            model = copy.deepcopy(dense)
            spec = {
                "pruning": {**recipe["pruning"], "final_sparsity": s, "ignore": []},
                "curvature": {"damping": GAMMA, "likelihood": "categorical", **recipe.get("curvature", {})},
            }
            oneshot(model, batches, spec)
            rows[name][str(s)] = loss(model, x, y) - dense_loss
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    report = {
        "command": "python -m benchmarks.exact_fisher" + (" --quick" if args.quick else ""),
        "net": list(sizes),
        "weights": len(flat),
        "examples": len(x),
        "damping": GAMMA,
        "dense_loss": dense_loss,
        "loss_rise": rows,
    }
    with open(args.output, "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    sparsities = list(next(iter(report["loss_rise"].values())))
    lines = [
        f"Rise in training loss after one-shot pruning (dense {report['dense_loss']:.3f}; lower is better)",
        "",
        "| rule | " + " | ".join(f"{100 * float(s):.0f} %" for s in sparsities) + " |",
        "|---|" + "---|" * len(sparsities),
    ]
    for name, values in report["loss_rise"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[s]:.4f}" for s in sparsities) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""The problem: a small tanh MLP on a synthetic task, with its exact (float64) Fisher, Jacobians and loss gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

D_IN, HIDDEN, CLASSES, N_TRAIN, N_TEST = 16, 32, 6, 2048, 2048
TRAIN_STEPS, TRAIN_LR = 400, 1e-2


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
        return {
            f"{n}.weight": vector[o : o + r * c].reshape(r, c)
            for (n, (r, c)), o in zip(self.shapes.items(), self.offsets.values())
        }


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
        "train_steps": TRAIN_STEPS,
        "train_accuracy": train_acc,
        "train_loss": train_loss,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "grad_norm": float(problem.grad.norm()),
        "fisher_eigenvalues": {
            f"q{int(100 * q)}": float(eig[round(q * (len(eig) - 1))]) for q in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
        },
        "fisher_mean_diagonal": float(problem.fisher.diagonal().mean()),
    }

"""Output distributions for the true Fisher: sample labels and apply the output-space Fisher H_out.

Every likelihood works on `logits` of shape (batch, [positions,] outputs) with a `valid` mask over
(batch, [positions]) that marks which rows count (attention / label masks). The Fisher is the
average over valid rows, matching the mean loss HF models report:

    F = (1 / N_valid) Σ_rows J_rowᵀ H_out(row) J_row

- categorical (softmax): H_out = diag(p) − ppᵀ;
- bernoulli (sigmoid, multi-label): H_out = diag(σ(1 − σ));
- gaussian (regression, fixed σ): H_out = I / σ².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Likelihood:
    """Base class; subclasses define `fisher_product`, `sample` and `nll`."""

    name: str = "base"

    def fisher_product(self, logits: torch.Tensor, tangent: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """H_out · tangent per row, zero on invalid rows, divided by the number of valid rows."""
        raise NotImplementedError

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Labels drawn from the model's predictive distribution (same layout `nll` expects)."""
        raise NotImplementedError

    def nll(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood over valid rows."""
        raise NotImplementedError


def _for_generator(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sampling must happen on the generator's device (a CPU generator cannot drive CUDA sampling)."""
    return t if generator is None else t.to(generator.device)


def _scale(valid: torch.Tensor) -> torch.Tensor:
    return valid.to(torch.float32)[..., None] / valid.sum().clamp_min(1)


class Categorical(Likelihood):
    def __init__(self) -> None:
        object.__setattr__(self, "name", "categorical")

    def fisher_product(self, logits, tangent, valid):
        p = torch.softmax(logits.float(), dim=-1)
        hv = p * tangent - p * (p * tangent).sum(-1, keepdim=True)
        return hv * _scale(valid)

    def sample(self, logits, generator=None):
        p = _for_generator(torch.softmax(logits.float(), dim=-1), generator)
        # A non-finite row (overflowing activations) would make multinomial raise; its label is meaningless
        # anyway, and the non-finite statistics that row leads to are caught downstream.
        p = torch.where(torch.isfinite(p).all(-1, keepdim=True), p, torch.ones_like(p))
        flat = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator)
        return flat.reshape(p.shape[:-1]).to(logits.device)

    def nll(self, logits, labels, valid):
        losses = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp_min(0), reduction="none"
        )
        mask = valid.reshape(-1).float()
        return (losses * mask).sum() / mask.sum().clamp_min(1)


class Bernoulli(Likelihood):
    def __init__(self) -> None:
        object.__setattr__(self, "name", "bernoulli")

    def fisher_product(self, logits, tangent, valid):
        s = torch.sigmoid(logits.float())
        return s * (1 - s) * tangent * _scale(valid)

    def sample(self, logits, generator=None):
        probs = _for_generator(torch.sigmoid(logits.float()), generator).nan_to_num(0.5)  # see Categorical.sample
        return torch.bernoulli(probs, generator=generator).to(logits.device)

    def nll(self, logits, labels, valid):
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").sum(-1)
        mask = valid.float()
        return (losses * mask).sum() / mask.sum().clamp_min(1)


class Gaussian(Likelihood):
    def __init__(self, sigma: float = 1.0) -> None:
        object.__setattr__(self, "name", "gaussian")
        object.__setattr__(self, "sigma", float(sigma))

    def fisher_product(self, logits, tangent, valid):
        return tangent / self.sigma**2 * _scale(valid)

    def sample(self, logits, generator=None):
        device = generator.device if generator is not None else logits.device
        noise = torch.randn(logits.shape, generator=generator, device=device).to(logits.device)
        return logits.float() + self.sigma * noise

    def nll(self, logits, labels, valid):
        losses = 0.5 * ((labels.float().reshape(logits.shape) - logits.float()) / self.sigma).pow(2).sum(-1)
        mask = valid.float()
        return (losses * mask).sum() / mask.sum().clamp_min(1)


LIKELIHOODS = {"categorical": Categorical, "bernoulli": Bernoulli, "gaussian": Gaussian}


def likelihood_for(name: str, model_config: object | None = None) -> Likelihood:
    """Resolve `curvature.likelihood`; `auto` reads an HF config's `problem_type` / `num_labels`."""
    if name == "auto":
        problem = getattr(model_config, "problem_type", None)
        if problem == "regression" or (problem is None and getattr(model_config, "num_labels", 2) == 1):
            name = "gaussian"
        elif problem == "multi_label_classification":
            name = "bernoulli"
        else:
            name = "categorical"
    return LIKELIHOODS[name]()

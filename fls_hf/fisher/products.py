"""Fisher-vector products with the true Fisher, for the tangent restricted to a set of parameters.

- `ggn_product` (default): the exact Gauss-Newton product F·v = Jᵀ H_out J v. Deterministic given
  the batch, always PSD, no label sampling and no finite differences (safe in low precision models
  since the maths runs in fp32 with autocast off). J v is obtained with the double-backward trick
  (a vjp of a vjp), which works for every op with a backward — no forward-mode support needed.
- `hvp_product` (option): Hessian-vector product of the NLL at labels sampled from the model.
  Unbiased for F but may be indefinite for a single draw.

Both run in eval mode (dropout off, BatchNorm statistics untouched) and leave `param.grad` alone, so
they can run in the middle of a Trainer step whose gradients are still live.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..model.forward import (
    curvature_mode,
    logits_of,
    model_device,
    model_inputs,
    unwrap,
    valid_rows,
    with_decoder_inputs,
)
from .likelihoods import Likelihood


def _forward(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = with_decoder_inputs(model, batch)
    inputs = model_inputs(batch, model_device(model))
    logits = logits_of(model(**inputs)).float()
    return logits, valid_rows(batch, logits)


def ggn_product(
    model: nn.Module,
    batch: Mapping[str, Any],
    tangents: Mapping[nn.Parameter, torch.Tensor],
    likelihood: Likelihood,
) -> list[torch.Tensor]:
    """F·v = Jᵀ H_out J v for the tangent `v` given per parameter; returns one tensor per parameter.

    F is averaged over the valid output rows of the batch (the scale of the mean loss).
    """
    params = list(tangents)
    model = unwrap(model)
    with curvature_mode(model):
        logits, valid = _forward(model, batch)
        dual = torch.zeros_like(logits, requires_grad=True)
        jt_dual = torch.autograd.grad(logits, params, grad_outputs=dual, create_graph=True)
        # Jᵀ·dual is linear in dual, so differentiating ⟨Jᵀ dual, v⟩ w.r.t. dual gives J v.
        jv = torch.autograd.grad(
            jt_dual, dual, grad_outputs=[tangents[p].to(p.dtype) for p in params], retain_graph=True
        )[0]
        h_jv = likelihood.fisher_product(logits.detach(), jv.float(), valid)
        fv = torch.autograd.grad(logits, params, grad_outputs=h_jv)
    return [f.float() for f in fv]


def hvp_product(
    model: nn.Module,
    batch: Mapping[str, Any],
    tangents: Mapping[nn.Parameter, torch.Tensor],
    likelihood: Likelihood,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """H·v of the NLL at labels sampled from the model (E over labels of H is F)."""
    params = list(tangents)
    model = unwrap(model)
    with curvature_mode(model):
        logits, valid = _forward(model, batch)
        labels = likelihood.sample(logits.detach(), generator=generator)
        loss = likelihood.nll(logits, labels, valid)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * tangents[p].to(g.dtype)).sum() for g, p in zip(grads, params))
        hv = torch.autograd.grad(dot, params)
    return [h.float() for h in hv]


def sampled_gradient(
    model: nn.Module,
    batch: Mapping[str, Any],
    params: list[nn.Parameter],
    likelihood: Likelihood,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Batch gradient of the NLL at labels sampled from the model (for gradient-direction u)."""
    model = unwrap(model)
    with curvature_mode(model):
        logits, valid = _forward(model, batch)
        labels = likelihood.sample(logits.detach(), generator=generator)
        grads = torch.autograd.grad(likelihood.nll(logits, labels, valid), params)
    return [g.float() for g in grads]


FISHER_PRODUCTS = {"ggn": ggn_product, "hvp": hvp_product}

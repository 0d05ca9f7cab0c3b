"""Kronecker (K-FAC) Fisher statistics from sampled-label passes, used to initialise FishLeg's Q.

For a linear map with inputs a_t and output gradients δ_t at token positions t, the per-example
gradient is g = Σ_t δ_t a_tᵀ. K-FAC treats δ and a as independent and tokens as uncorrelated:

    F ≈ G ⊗ Ā,   G = E_n[Σ_t δ_nt δ_ntᵀ],   Ā = E_{n,t}[ā ā ᵀ]  (ā = [a; 1] when the layer has a bias),

with labels sampled from the model (true Fisher). Only diag G (rows,) and Ā ((cols+1)²) are kept:
the FishLeg structures need no more (diagonal: G_ii Ā_jj; within-row blocks: G_ii Ā_JJ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_mean_
from ..errors import CurvatureError
from ..progress import example_progress
from .adapters import Conv1DAdapter, LayerAdapter
from .forward import curvature_mode, logits_of, model_device, model_inputs, unwrap, valid_rows
from .likelihoods import Likelihood


@contextlib.contextmanager
def _capture(layers: Mapping[str, LayerAdapter], store: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """Record each layer's input and output-gradient for one forward/backward; hooks always removed."""
    handles = []

    def forward_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            store[name]["a"] = inputs[0].detach()
            output.register_hook(lambda grad: store[name].__setitem__("d", grad.detach()))
        return hook

    try:
        for name, adapter in layers.items():
            if not isinstance(adapter.module, nn.Linear) and not isinstance(adapter, Conv1DAdapter):
                raise CurvatureError(f"`curvature.init: kfac` supports Linear and Conv1D layers; `{name}` is {type(adapter.module).__name__}")
            handles.append(adapter.module.register_forward_hook(forward_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def kronecker_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    layers: Mapping[str, LayerAdapter],
    likelihood: Likelihood,
    *,
    generator: torch.Generator | None = None,
    max_examples: int = 256,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (Ā: (cols+1, cols+1), diag G: (rows,)), averaged over up to `max_examples` examples."""
    model = unwrap(model)
    device = model_device(model)
    sums = {n: [torch.zeros(a.shape[1] + 1, a.shape[1] + 1, device=device), torch.zeros(a.shape[0], device=device)] for n, a in layers.items()}
    examples, tokens = 0, 0.0
    store: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
    params = [a.weight for a in layers.values()]
    bar = example_progress(max_examples, "K-FAC statistics")
    with curvature_mode(model), _capture(layers, store), bar:
        for batch in batches:
            if examples >= max_examples:
                break
            logits = logits_of(model(**model_inputs(batch, device))).float()
            valid = valid_rows(batch, logits)
            labels = likelihood.sample(logits.detach(), generator=generator)
            n = logits.shape[0]
            # Σ_n nll_n (sequence outputs: nll_n is the example's loss; token outputs: per-token mean × n)
            torch.autograd.grad(likelihood.nll(logits, labels, valid) * n, params, allow_unused=True)
            token_mask = _token_mask(batch, store[next(iter(layers))]["a"], device)
            tokens += float(token_mask.sum())
            for name in layers:
                a, d = store[name]["a"].float(), store[name]["d"].float()
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)[token_mask]
                sums[name][0] += a.T @ a
                sums[name][1] += d.pow(2).reshape(-1, d.shape[-1]).sum(0)
            examples += n
            bar.update(n)
    if examples == 0:
        raise CurvatureError("empty calibration dataloader: K-FAC statistics need at least one batch")
    if tokens == 0:
        raise CurvatureError(
            "calibration batches hold no real token (every `attention_mask` entry is 0): K-FAC statistics "
            "(`curvature.init: kfac`) need unpadded tokens"
        )
    flat = [t for pair in sums.values() for t in pair]
    scale = [1.0 / tokens, 1.0 / examples] * len(sums)
    for t, s in zip(flat, scale):
        t.mul_(s)
    all_reduce_mean_(flat)
    return {name: (pair[0], pair[1]) for name, pair in sums.items()}


def _token_mask(batch: Mapping[str, Any], activations: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Bool over the activations' leading dims: real tokens only (padding carries no signal)."""
    lead = activations.shape[:-1]
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(lead):
        return mask.to(device).bool()
    return torch.ones(lead, dtype=torch.bool, device=device)

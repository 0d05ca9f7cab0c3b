"""Per-example gradients of each example's own loss w.r.t. each prunable layer's weight matrix view.

The per-example loss ℓ_n is the likelihood's NLL of example n; for token outputs it is the mean over
the example's valid positions (attention mask, `-100` labels), for sequence outputs its single row:

    ℓ_n = (1 / |T_n|) Σ_{t ∈ T_n} −log p(y_{n,t} | x_n),      g_n = ∂ℓ_n / ∂W   (rows, cols)

(an example with no valid position has ℓ_n = 0, g_n = 0, and still counts as an example).

Linear, GPT-2 Conv1D and plain Conv2d layers get every g_n from ONE forward/backward of the batch: a
forward hook keeps the layer input a_n,t, a tensor hook on the output receives δ_n,t = ∂L/∂out_n,t for
the SUMMED loss L = Σ_n ℓ_n (so δ_n,t = ∂ℓ_n/∂out_n,t in eval mode, where examples do not interact), and

    g_n = Σ_t δ_n,tᵀ a_n,t           (einsum over positions, summed over repeated calls).

For a Conv2d, t runs over output positions: a_n,t is the input patch under t (im2col, `patches.py`).
Convs that are not plain (groups > 1, non-zero padding modes, overridden forwards), weights shared
with another module (tied embeddings) and layers whose input does not lead with the batch dimension
fall back to a loop of batch-size-1 `torch.autograd.grad`. `param.grad` is never touched, so a
Trainer's live gradients stay intact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CurvatureError
from ..model.adapters import Conv1D, LayerAdapter
from ..model.forward import (
    curvature_mode,
    logits_of,
    model_device,
    model_inputs,
    requires_grad,
    unwrap,
    valid_rows,
    with_decoder_inputs,
)
from ..model.patches import conv_output_rows, conv_patches, plain_conv
from ..progress import example_progress, log_main
from .hooks import layer_hooks
from .likelihoods import Likelihood

FISHER_LABELS = ("empirical", "sampled", "expected")
MAX_EXPECTED_CLASSES = 64  # `expected` costs one backward pass per class
_HOOKABLE: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_causal_lm(model: nn.Module) -> bool:
    """True for next-token models, whose logits at t are scored against the label at t + 1 (as HF does)."""
    name = type(model).__name__
    return bool(getattr(getattr(model, "config", None), "is_decoder", False)) or name.endswith(
        ("ForCausalLM", "LMHeadModel")
    )


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in model_inputs(batch).values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise CurvatureError(f"calibration batch has no tensor inputs (keys: {sorted(batch)})")


def _slice(batch: Mapping[str, Any], start: int, stop: int, size: int) -> dict[str, Any]:
    """Examples [start, stop) of every tensor whose leading dimension is the batch size."""
    return {
        k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
        for k, v in batch.items()
    }


def fisher_targets(
    batch: Mapping[str, Any], logits: torch.Tensor, mode: str, likelihood: Likelihood, generator: torch.Generator | None
) -> torch.Tensor:
    """Data labels (`empirical`) or labels drawn from the model (`sampled`, on the generator's device)."""
    if mode == "empirical":
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise CurvatureError(
                "recipe key `curvature.fisher_labels` = 'empirical' needs `labels` in every calibration batch; use "
                "'sampled'"
            )
        return labels.to(logits.device)
    source = logits.detach()
    if generator is not None and generator.device != source.device:
        return likelihood.sample(source.to(generator.device), generator=generator).to(logits.device)
    return likelihood.sample(source, generator=generator)


def example_losses(
    batch: Mapping[str, Any], logits: torch.Tensor, targets: torch.Tensor, likelihood: Likelihood, shift: bool
) -> torch.Tensor:
    """ℓ_n, shape (b,): the likelihood's mean NLL over example n's valid rows.

    Valid rows follow `valid_rows` on the batch (attention mask, data labels ≠ -100, also for sampled
    targets); with `shift` (empirical causal LM) logits[:, :-1] meet targets[:, 1:] and the mask shifts too.
    """
    view: Mapping[str, Any] = batch
    if shift:
        mask = batch.get("attention_mask")
        view = {"labels": targets[:, 1:], **({"attention_mask": mask[:, 1:]} if isinstance(mask, torch.Tensor) else {})}
        logits, targets = logits[:, :-1], targets[:, 1:]
    valid = valid_rows(view, logits)
    return torch.stack(
        [likelihood.nll(logits[n : n + 1], targets[n : n + 1], valid[n : n + 1]) for n in range(logits.shape[0])]
    )


def batch_losses(
    model: nn.Module, batch: Mapping[str, Any], mode: str, likelihood: Likelihood, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, ℓ_n) of one batch: the model's logits scored against `mode` labels (`fisher_targets`) by
    `example_losses`, shifted for a causal LM's data labels."""
    batch = with_decoder_inputs(model, batch)
    logits = logits_of(model(**model_inputs(batch, model_device(model)))).float()
    targets = fisher_targets(batch, logits, mode, likelihood, generator)
    shift = mode == "empirical" and is_causal_lm(model)
    return targets, example_losses(batch, logits, targets, likelihood, shift)


def data_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    layers: Mapping[str, LayerAdapter],
    likelihood: Likelihood,
    *,
    max_batches: int | None = None,
    max_examples: int | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Per batch, (examples, {name: ∂ mean_n ℓ_n / ∂W as (rows, cols)}) of the data-label loss, until `max_batches`
    batches or `max_examples` examples are seen (needed for an endless stream). Iterate it to its end: the model is in
    curvature mode meanwhile. `.grad` of the training is untouched; FSDP2 layers give their own rows."""
    model = unwrap(model)
    names = list(layers)
    batches_seen = examples = 0
    with curvature_mode(model, double_backward=False), torch.enable_grad():
        for batch in batches:
            if (max_batches is not None and batches_seen >= max_batches) or (
                max_examples is not None and examples >= max_examples
            ):
                break
            losses = batch_losses(model, batch, "empirical", likelihood, None)[1]
            grads = torch.autograd.grad(losses.mean(), [layers[n].values for n in names], allow_unused=True)
            batches_seen += 1
            examples += len(losses)
            yield (
                len(losses),
                {
                    n: torch.zeros(layers[n].shape, device=layers[n].weight.device)
                    if g is None
                    else layers[n].to_matrix(g)
                    for n, g in zip(names, grads)
                },
            )


@contextlib.contextmanager
def _capture(layers: Mapping[str, LayerAdapter], size: int) -> Iterator[tuple[dict[str, torch.Tensor], set[str]]]:
    """Hooks filling `sums[name]` (size, rows, cols) with Σ_t δ_n,tᵀ a_n,t; `misfits` lists layers to loop."""
    sums: dict[str, torch.Tensor] = {}
    misfits: set[str] = set()

    def on_forward(name: str, module: nn.Module, a: torch.Tensor, output: torch.Tensor) -> None:
        conv = isinstance(module, nn.Conv2d)
        if a.shape[0] != size or not output.requires_grad or (conv and a.dim() != 4):  # conv: 3-d is unbatched
            misfits.add(name)
            return
        # a conv's patches (kh·kw times its input) are unfolded only when its δ arrives, one layer at a time
        a = a.detach() if conv else a.detach().reshape(size, -1, a.shape[-1]).float()

        def on_grad(delta: torch.Tensor) -> None:
            rows = conv_output_rows(delta) if conv else delta.reshape(size, -1, delta.shape[-1]).float()
            g = torch.einsum("bto,bti->boi", rows, conv_patches(module, a) if conv else a)
            sums[name] = sums[name] + g if name in sums else g

        output.register_hook(on_grad)

    with layer_hooks(layers, on_forward):
        yield sums, misfits


def _shared_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, count in seen.items() if count > 1}


def hooked_layers(model: nn.Module, layers: Mapping[str, LayerAdapter]) -> set[str]:
    """Layers whose per-example gradients come from the one hooked pass (the rest loop; see the module doc)."""
    shared = _shared_weight_ids(unwrap(model))
    return {
        n
        for n, a in layers.items()
        if (isinstance(a.module, _HOOKABLE) or plain_conv(a.module)) and id(a.weight) not in shared
    }


def _batch_gradients(
    model: nn.Module,
    batch: Mapping[str, Any],
    layers: Mapping[str, LayerAdapter],
    hookable: set[str],
    mode: str,
    likelihood: Likelihood,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    size, device, shift = _batch_size(batch), model_device(model), mode == "empirical" and is_causal_lm(model)
    batch = with_decoder_inputs(model, batch)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with curvature_mode(model), torch.enable_grad(), requires_grad((a.weight for a in layers.values()), True):
        with _capture({n: layers[n] for n in hookable}, size) as (sums, misfits):
            targets, losses = batch_losses(model, batch, mode, likelihood, generator)
            if hookable and losses.requires_grad:
                torch.autograd.grad(losses.sum(), [layers[n].weight for n in hookable], allow_unused=True)
        looped = [n for n in layers if n not in hookable or n in misfits]
        per_example: dict[str, list[torch.Tensor]] = {n: [] for n in looped}
        for i in range(size if looped else 0):
            one = _slice(batch, i, i + 1, size)
            loss = example_losses(
                one, logits_of(model(**model_inputs(one))).float(), targets[i : i + 1], likelihood, shift
            )[0]
            weights = [layers[n].weight for n in looped]
            grads = (
                torch.autograd.grad(loss, weights, allow_unused=True) if loss.requires_grad else [None] * len(weights)
            )
            for n, w, g in zip(looped, weights, grads):
                per_example[n].append(layers[n].to_matrix(torch.zeros_like(w) if g is None else g).float())
    out = {}
    for name, adapter in layers.items():
        if name in per_example:
            out[name] = torch.stack(per_example[name])
        else:
            out[name] = sums[name] if name in sums else torch.zeros(size, *adapter.shape, device=device)
    return out


def per_example_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    layers: Mapping[str, LayerAdapter],
    *,
    labels: str = "empirical",
    likelihood: Likelihood,
    generator: torch.Generator | None = None,
    max_examples: int | None = None,
    keep: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, per batch, `{name: g}` with g: (b, rows, cols) fp32, g[n] = ∂ℓ_n/∂W in the matrix view.

    Args:
        labels: `empirical` scores the batch's `labels` (causal LMs: logits[:, :-1] against
            labels[:, 1:], as HF does); `sampled` draws labels from the model (the true Fisher; no
            shift, every valid position is scored against its own draw); `expected` yields, per batch,
            one gradient set per class c scaled by √(C p_c) (sequence classification only): the mean
            of their outer products is the exact true Fisher, and `max_examples` counts these vectors.
        likelihood: output distribution (`likelihood_for(name, model.config)`).
        generator: RNG of the `sampled` labels (labels are drawn on its device).
        max_examples: stop after this many examples; the last batch is cut to fit.
        keep: name → bool (rows, cols); gradients are multiplied by it (pruned coordinates are 0).

    Each batch runs in `curvature_mode` (eval, no autocast) on the unwrapped model; hooks are removed
    before the batch is yielded, so the model is untouched between yields.
    """
    if labels not in FISHER_LABELS:
        raise CurvatureError(f"recipe key `curvature.fisher_labels` = {labels!r}; allowed: {', '.join(FISHER_LABELS)}")
    model = unwrap(model)
    hookable = hooked_layers(model, layers)
    iterator, seen = iter(batches), 0
    while max_examples is None or seen < max_examples:
        batch = next(iterator, None)
        if batch is None:
            return
        size = _batch_size(batch)
        probs = torch.softmax(_class_logits(model, batch, likelihood), dim=-1) if labels == "expected" else None
        passes = 1 if probs is None else probs.shape[-1]
        if max_examples is not None and seen + size * passes > max_examples:
            fit = -(-(max_examples - seen) // passes)  # whole examples: every class pass sees the same ones
            batch, size = _slice(batch, 0, fit, size), fit
            probs = None if probs is None else probs[:fit]
        if probs is not None:
            results = _expected_gradients(model, batch, probs, layers, hookable, likelihood)
        else:
            results = iter([_batch_gradients(model, batch, layers, hookable, labels, likelihood, generator)])
        for grads in results:
            for name, k in (keep or {}).items():
                if name in grads:
                    grads[name] = grads[name] * k.to(grads[name].device, grads[name].dtype)
            seen += size
            yield grads


def _class_logits(model: nn.Module, batch: Mapping[str, Any], likelihood: Likelihood) -> torch.Tensor:
    """Logits (b, C) of a no-grad pass, checked for the `expected` mode (one categorical row per example)."""
    with curvature_mode(model), torch.no_grad():
        logits = logits_of(model(**model_inputs(batch, model_device(model)))).float()
    if likelihood.name != "categorical" or logits.dim() != 2 or logits.shape[-1] > MAX_EXPECTED_CLASSES:
        raise CurvatureError(
            "recipe key `curvature.fisher_labels` = 'expected' needs one categorical output row per example with at "
            "most "
            f"{MAX_EXPECTED_CLASSES} classes (sequence classification); got {likelihood.name} logits of shape "
            f"{tuple(logits.shape)}: use 'sampled'"
        )
    return logits


def _expected_gradients(
    model: nn.Module,
    batch: Mapping[str, Any],
    probs: torch.Tensor,
    layers: Mapping[str, LayerAdapter],
    hookable: set[str],
    likelihood: Likelihood,
) -> Iterator[dict[str, torch.Tensor]]:
    """One gradient set per class c: g_{n,c} · √(C p_{n,c}), so the mean of g gᵀ over all C·b vectors is the
    exact true Fisher (1/b) Σ_n Σ_c p_{n,c} g_{n,c} g_{n,c}ᵀ (= J_nᵀ (diag p − ppᵀ) J_n): no label-sampling noise."""
    classes = probs.shape[-1]
    for c in range(classes):
        labelled = {**batch, "labels": torch.full((probs.shape[0],), c, dtype=torch.long)}
        grads = _batch_gradients(model, labelled, layers, hookable, "empirical", likelihood, None)
        weight = (classes * probs[:, c]).sqrt()
        yield {name: g * weight.to(g.device)[:, None, None] for name, g in grads.items()}


def counted_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    layers: Mapping[str, LayerAdapter],
    *,
    labels: str,
    likelihood: Likelihood,
    generator: torch.Generator | None,
    max_examples: int,
    keep: Mapping[str, torch.Tensor] | None = None,
    desc: str = "Per-example gradients",
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """`per_example_gradients` as (b, {name: (b, rows, cols)}) pairs, with a progress bar in examples.

    Raises `CurvatureError` when the batches hold no example; logs when they run out before `max_examples`.
    """
    bar, seen = example_progress(max_examples, desc), 0
    try:
        for grads in per_example_gradients(
            model,
            batches,
            layers,
            labels=labels,
            likelihood=likelihood,
            generator=generator,
            max_examples=max_examples,
            keep=keep,
        ):
            size = next(iter(grads.values())).shape[0] if grads else 0
            seen += size
            bar.update(size)
            yield size, grads
    finally:
        bar.close()
    if seen == 0:
        raise CurvatureError("empty calibration dataloader: the Fisher estimate needs at least one example")
    if seen < max_examples:
        log_main("%s from %d examples: the calibration batches ran out before %d", desc, seen, max_examples)

"""Run a model on a batch for curvature work: logits, valid-row mask, eval mode, fp32, no labels.

Curvature passes never use the data labels for the true Fisher (labels are sampled from the model),
so label keys are removed before the forward. They run in eval mode (dropout off, BatchNorm
statistics untouched) with autocast disabled, and restore the model's mode afterwards. An encoder-decoder's
decoder still reads the target sequence: `with_decoder_inputs` makes its inputs from the labels first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import CurvatureError

LABEL_KEYS = ("labels", "label", "label_ids", "start_positions", "end_positions")


def model_inputs(batch: Mapping[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """The batch without label keys, tensors moved to `device`."""
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if device is not None:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs


DECODER_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")


def is_seq2seq_batch(batch: Mapping[str, Any]) -> bool:
    """Whether the batch feeds an encoder-decoder's decoder (after `with_decoder_inputs`): its outputs are the
    decoder's rows, whose mask is `decoder_attention_mask`, not the source's `attention_mask`."""
    return any(k in batch for k in DECODER_INPUT_KEYS)


def with_decoder_inputs(model: nn.Module, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """An encoder-decoder's batch with `decoder_input_ids` made from its `labels`, as the model's own loss does
    (the labels shifted right behind the decoder's start token); any other model's batch as it is.

    Curvature passes drop the labels (the true Fisher samples its own), so without this T5 has no decoder input
    and BART would read the source as its target sequence."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or is_seq2seq_batch(batch):
        return batch
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise CurvatureError(
            f"{type(inner).__name__} is an encoder-decoder: curvature passes run its decoder on the target sequence, "
            f"so calibration batches need `labels` or `decoder_input_ids`; this batch has {sorted(batch)}"
        )
    prepare = getattr(inner, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return {**batch, "decoder_input_ids": prepare(labels=labels)}
    start, pad = getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)
    if start is None or pad is None:
        raise CurvatureError(
            f"{type(inner).__name__}'s config has no `decoder_start_token_id` / `pad_token_id` to make the decoder's "
            "inputs from `labels`: pass `decoder_input_ids` in the calibration batches"
        )
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return {**batch, "decoder_input_ids": shifted.masked_fill(shifted == -100, pad)}


def token_masks(batch: Mapping[str, Any]) -> list[torch.Tensor]:
    """The batch's masks of real tokens: `attention_mask`, and for an encoder-decoder the decoder's
    (`decoder_attention_mask`, else labels ≠ -100); a layer's rows take the one whose shape matches theirs."""
    masks = [batch.get("attention_mask")]
    if is_seq2seq_batch(batch):
        decoder, labels = batch.get("decoder_attention_mask"), batch.get("labels")
        if not isinstance(decoder, torch.Tensor) and isinstance(labels, torch.Tensor):
            decoder = labels != -100
        masks.append(decoder)
    return [m for m in masks if isinstance(m, torch.Tensor)]


def valid_rows(batch: Mapping[str, Any], logits: torch.Tensor) -> torch.Tensor:
    """Bool mask over the logits' leading dims: attention mask (an encoder-decoder's: the decoder's) and `-100`
    labels for token outputs."""
    lead = logits.shape[:-1]
    if logits.dim() == 2:
        return torch.ones(lead, dtype=torch.bool, device=logits.device)
    valid = torch.ones(lead, dtype=torch.bool, device=logits.device)
    mask = batch.get("decoder_attention_mask" if is_seq2seq_batch(batch) else "attention_mask")
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(lead):
        valid &= mask.to(logits.device).bool()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(lead):
        valid &= labels.to(logits.device) != -100
    return valid


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits `(..., classes)` in whatever a model's forward returned.

    Read from a tensor itself, a mapping's `"logits"` key (a transformers `ModelOutput`, or a custom
    model's `{"loss": ..., "logits": ...}`), an object's `logits` attribute, or a tuple / list's first
    element; anything else raises `CurvatureError` naming what came back.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        logits, found = outputs.get("logits"), f"{type(outputs).__name__} with keys {list(outputs)}"
    elif hasattr(outputs, "logits"):
        logits, found = outputs.logits, f"{type(outputs).__name__} whose `logits` is {type(outputs.logits).__name__}"
    elif isinstance(outputs, (tuple, list)) and outputs:
        logits, found = outputs[0], f"{type(outputs).__name__} whose first element is {type(outputs[0]).__name__}"
    else:
        logits, found = None, type(outputs).__name__
    if isinstance(logits, torch.Tensor):
        return logits
    raise CurvatureError(
        f"the model's forward returned {found}; curvature passes need the logits: a tensor, a ModelOutput or "
        "dict with a `logits` tensor, or a tuple / list whose first element is the logits tensor"
    )


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def curvature_mode(model: nn.Module, *, double_backward: bool = True) -> Iterator[None]:
    """Eval mode, autocast off and (for `double_backward`) the math attention kernel for a curvature pass.

    The fused SDPA kernels have no double backward, which the GGN product (a vjp of a vjp) needs; first-order
    passes (K-FAC statistics) keep them: the math kernel holds every attention matrix for the backward.
    """
    was_training = model.training
    model.eval()
    device_type = model_device(model).type
    kernels = sdpa_kernel([SDPBackend.MATH]) if double_backward else contextlib.nullcontext()
    try:
        with torch.autocast(device_type=device_type, enabled=False), kernels:
            yield
    finally:
        model.train(was_training)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / torch.compile wrappers (curvature passes must not trigger DDP hooks)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def requires_grad(params: Iterable[nn.Parameter], value: bool) -> Iterator[None]:
    """Set `requires_grad` to `value` on the given parameters for the block; the ones changed are restored after
    (frozen PEFT base weights made trainable for a gradient pass, or every weight frozen for a statistics pass)."""
    changed = [p for p in params if p.requires_grad != value]
    try:
        for p in changed:
            p.requires_grad_(value)
        yield
    finally:
        for p in changed:
            p.requires_grad_(not value)

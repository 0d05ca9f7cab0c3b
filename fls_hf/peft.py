"""Pruning under LoRA: the base weights are pruned while the adapters train, then merged without densifying.

A recipe written for the plain model works unchanged on the PEFT-wrapped one (see `targets.py`): a
LoRA-wrapped layer resolves to its `base_layer`, so masks are keyed by names like
`base_model.model.bert.encoder.layer.0.attention.self.query.base_layer`. The adapters themselves are
never pruned: their update ΔW = s·B·A is dense, so the trained model computes with W ⊙ keep + ΔW.

Merging with plain `merge_and_unload()` writes W ⊙ keep + ΔW into the weight and so undoes the sparsity.
`masked_merge_and_unload` merges and then re-applies the masks: the merged weight is (W + ΔW) ⊙ keep,
exactly as sparse as the pruned base weight; what is lost is the adapter's contribution on pruned
coordinates, ΔW ⊙ (1 − keep).

Example:
    >>> from fls_hf.peft import masked_merge_and_unload
    >>> trainer = FishLegPruningTrainer(model=get_peft_model(model, lora_config), args=args, recipe=recipe, ...)
    >>> trainer.train()
    >>> merged = masked_merge_and_unload(trainer.model, trainer.pruner)   # plain model, zeros kept
    >>> merged.save_pretrained("out")
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from .errors import FlsError
from .model.forward import unwrap
from .model.targets import peft_inner_name, plain_name
from .pruning.masks import MaskSet
from .pruning.pruner import Pruner

MERGE_WARNING = (
    "fls_hf: {count} pruned layer(s) of this PEFT model carry adapters (e.g. `{example}`): a plain "
    "`merge_and_unload()` adds the dense adapter update to the pruned weights and undoes the sparsity. "
    "Merge with `fls_hf.peft.masked_merge_and_unload(model, trainer.pruner)` to keep the zeros."
)


def is_peft_model(model: nn.Module) -> bool:
    """True for a `peft.PeftModel` (DDP / compiled wrappers are looked through)."""
    # No PeftModel can exist before peft is imported, so a plain model never pays for importing it here.
    peft_model_class = getattr(sys.modules.get("peft"), "PeftModel", None)
    return peft_model_class is not None and isinstance(unwrap(model), peft_model_class)


def _mask_set(masks: Pruner | MaskSet) -> MaskSet:
    if isinstance(masks, Pruner):
        return masks.masks
    if isinstance(masks, MaskSet):
        return masks
    raise FlsError(f"masks must be a fls_hf Pruner or MaskSet, not {type(masks).__name__}")


def _merged_names(model: nn.Module, masks: Pruner | MaskSet) -> dict[str, str]:
    """Mask key (a module of the PEFT model) → the same module's name in the merged model.

    Checked before anything is merged: each key must name a module of `model`, and its plain name
    (`targets.plain_name`) must lead, in the base model, to that module or to the wrapper standing for it.

    Raises:
        FlsError: `model` is no PEFT model, or a mask key has no matching module.
    """
    peft_model = unwrap(model)
    if not is_peft_model(peft_model):
        raise FlsError(
            f"{type(peft_model).__name__} is not a PEFT model (peft.PeftModel): there is nothing to merge, "
            "its pruned weights already are the model's weights"
        )
    modules, base = dict(peft_model.named_modules()), peft_model.get_base_model()
    names: dict[str, str] = {}
    for key in _mask_set(masks):
        merged = plain_name(key)
        try:
            found = base.get_submodule(merged)
        except AttributeError:
            found = None
        inner = peft_inner_name(found) if found is not None else None
        if key not in modules or (found.get_submodule(inner) if inner else found) is not modules[key]:
            raise FlsError(
                f"mask key `{key}` has no matching module `{merged}` in the merged {type(base).__name__}: "
                "masks must come from a Pruner built on this very PEFT model"
            )
        names[key] = merged
    return names


@torch.no_grad()
def masked_merge_and_unload(
    model: nn.Module, masks: Pruner | MaskSet, *, safe_merge: bool = False, adapter_names: list[str] | None = None
) -> nn.Module:
    """Merge the adapters into the base weights, then re-apply the masks; returns the merged plain model.

    Every masked weight becomes (W + ΔW) ⊙ keep: exactly the pruned zeros of the base weight, the
    adapter update kept on the surviving weights. `model` is modified in place (as by PEFT's
    `merge_and_unload`); the masks, keyed by the PEFT names, are mapped to the merged names.

    Args:
        model: a `peft.PeftModel` whose base weights were pruned (e.g. `trainer.model`).
        masks: the `Pruner` (e.g. `trainer.pruner`) or its `MaskSet`.
        safe_merge, adapter_names: passed to `merge_and_unload`.

    Raises:
        FlsError: `model` is no PEFT model, or a mask key has no matching module in the merged model.

    Example:
        >>> merged = masked_merge_and_unload(trainer.model, trainer.pruner)
        >>> sparsity_report(merged, trainer.recipe).global_sparsity   # as before the merge
    """
    mask_set = _mask_set(masks)
    names = _merged_names(model, mask_set)
    merged = unwrap(model).merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    for key, name in names.items():
        keep = mask_set.keep(key)
        weight = merged.get_submodule(name).weight
        if weight.shape != keep.shape:
            raise FlsError(
                f"mask key `{key}` has shape {tuple(keep.shape)}, merged module `{name}` {tuple(weight.shape)}"
            )
        weight.masked_fill_(keep.logical_not().to(weight.device), 0)
    return merged


def warn_if_merge_densifies(model: nn.Module, masks: Pruner | MaskSet) -> bool:
    """Warn (`UserWarning`) when a plain `merge_and_unload()` of `model` would undo pruning; True if it warned.

    That is the case when `model` is a PEFT model and some pruned layer is an adapter's `base_layer`.

    Example:
        >>> warn_if_merge_densifies(trainer.model, trainer.pruner)   # FishLegPruningCallback does this at train end
    """
    if not is_peft_model(model):
        return False
    if isinstance(masks, Pruner) and masks.blocks:  # neurons / heads: the adapters are held at zero on the removed
        return False  # groups' columns and rows (`Pruner.adapter_factors`), so a plain merge keeps them removed
    mask_set = _mask_set(masks)
    adapted = [key for key in mask_set if key.endswith(".base_layer") and mask_set.num_pruned(key) > 0]
    if adapted:
        warnings.warn(
            MERGE_WARNING.format(count=len(adapted), example=plain_name(adapted[0])), UserWarning, stacklevel=2
        )
    return bool(adapted)


__all__ = ["MERGE_WARNING", "is_peft_model", "masked_merge_and_unload", "warn_if_merge_densifies"]

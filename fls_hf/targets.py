"""Resolve a recipe's `targets` / `ignore` patterns to the model's prunable modules.

A pattern is either a module name (matched exactly or as a dotted suffix, so `classifier` matches
`bert.classifier`) or a regular expression prefixed with `re:` (matched against the whole name).
PEFT-wrapped layers (LoRA and friends keep the original module as `base_layer`) resolve to their
base layer, so the base weights are pruned while adapters train.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .curvature.adapters import LayerAdapter, adapter_for, require_adapter
from .errors import RecipeError


def name_matches(name: str, pattern: str) -> bool:
    """True when module `name` matches a `re:` regex or a plain (suffix) name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _peft_base(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):
        return f"{name}.base_layer", base
    return name, module


def _is_inside_peft_wrapper(name: str, wrapped_names: set[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in wrapped_names)


def resolve_targets(
    model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str] = ()
) -> dict[str, LayerAdapter]:
    """Map each targeted module name to its adapter, in sorted name order.

    Args:
        model: the model to prune.
        targets: patterns; `None` or empty means every supported module that `ignore` does not exclude.
        ignore: patterns removed from the result.

    Raises:
        RecipeError: a target pattern matches no module.
        UnsupportedModuleError: a target pattern names a module of an unsupported type.
    """
    modules = dict(model.named_modules())
    wrapped = {n for n, m in modules.items() if isinstance(getattr(m, "base_layer", None), nn.Module)}
    found: dict[str, LayerAdapter] = {}
    for pattern in targets or []:
        hits = [n for n in modules if n and name_matches(n, pattern) and not _is_inside_peft_wrapper(n, wrapped)]
        if not hits:
            raise RecipeError(
                f"recipe key `pruning.targets` pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"example module names: {', '.join(_example_names(model))}"
            )
        for hit in hits:
            if any(name_matches(hit, p) for p in ignore):
                continue
            name, module = _peft_base(hit, modules[hit])
            found[name] = require_adapter(name, module)
    if not targets:
        for name, module in modules.items():
            adapter = adapter_for(name, module)
            if adapter is None or _is_inside_peft_wrapper(name, wrapped) and not name.endswith(".base_layer"):
                continue
            if not any(name_matches(name, p) for p in ignore):
                found[name] = adapter
    return dict(sorted(found.items()))


def _example_names(model: nn.Module, limit: int = 6) -> list[str]:
    names = [n for n, m in model.named_modules() if adapter_for(n, m) is not None]
    return names[:limit] or [n for n, _ in model.named_modules() if n][:limit]

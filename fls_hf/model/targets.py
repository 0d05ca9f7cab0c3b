"""Resolve a recipe's `targets` / `ignore` patterns to the model's prunable modules.

A pattern is either a module name (matched exactly or as a dotted suffix, so `classifier` matches
`bert.classifier`) or a regular expression prefixed with `re:` (matched against the whole name).

PEFT-wrapped models take the recipe written for the plain model unchanged: every pattern is matched
against a module's own name and against its *plain name* (the name it had before PEFT wrapped the
model, see `plain_name`), and a pattern that matches a wrapper resolves to the module the wrapper
stands for: LoRA-style layers to their `base_layer` (so the base weights are pruned while the
adapters train), `modules_to_save` wrappers to the active trainable copy (the frozen
`original_module` is never targeted).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..errors import RecipeError
from .adapters import LayerAdapter, adapter_for, require_adapter

PEFT_PREFIX = "base_model.model."
_PEFT_SEGMENTS = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.|$)")


def name_matches(name: str, pattern: str) -> bool:
    """True when module `name` matches a `re:` regex or a plain (suffix) name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def plain_name(name: str) -> str:
    """The name a module of a PEFT model has in the model before wrapping (and after merging).

    Drops the `base_model.model.` prefix and the `.base_layer`, `.original_module` and
    `.modules_to_save.<adapter>` segments; names without them are returned unchanged.

    Example:
        >>> plain_name("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer")
        'bert.encoder.layer.0.attention.self.query'
    """
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return _PEFT_SEGMENTS.sub("", name)


def _matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(name_matches(name, pattern) for name in names for pattern in patterns)


def named_by(name: str, patterns: Sequence[str]) -> bool:
    """Whether a pattern names module `name`, by its name or by its name before PEFT wrapped the model."""
    return _matches((name, plain_name(name)), patterns)


def peft_inner_name(module: nn.Module) -> str | None:
    """Relative name of the module a PEFT wrapper stands for, or None when `module` is no wrapper."""
    if isinstance(getattr(module, "base_layer", None), nn.Module):
        return "base_layer"
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and isinstance(getattr(module, "original_module", None), nn.Module):
        active = [a for a in (getattr(module, "active_adapters", None) or list(copies)) if a in copies]
        return f"modules_to_save.{active[0]}" if active else None
    return None


def _outside_wrapped(name: str, inner: dict[str, str]) -> bool:
    """False when `name` lies inside a PEFT wrapper but not inside the module that wrapper stands for."""
    parts = name.split(".")
    for wrapper in (".".join(parts[:i]) for i in range(1, len(parts))):
        if wrapper in inner and name != inner[wrapper] and not name.startswith(inner[wrapper] + "."):
            return False
    return True


def _candidates(model: nn.Module) -> dict[str, str]:
    """Every module name → the name it resolves to (a wrapper → its inner module); modules elsewhere
    inside a PEFT wrapper (adapters, frozen copies) are left out."""
    modules = dict(model.named_modules())
    inner = {name: f"{name}.{rel}" for name, m in modules.items() if name and (rel := peft_inner_name(m)) is not None}
    return {name: inner.get(name, name) for name in modules if name and _outside_wrapped(name, inner)}


def resolve_targets(
    model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str] = ()
) -> dict[str, LayerAdapter]:
    """Map each targeted module name to its adapter, in sorted name order.

    Args:
        model: the model to prune (plain or PEFT-wrapped).
        targets: patterns; `None` or empty means every supported module that `ignore` does not exclude.
        ignore: patterns removed from the result.

    Raises:
        RecipeError: a target pattern matches no module.
        UnsupportedModuleError: a target pattern names a module of an unsupported type.
    """
    modules = dict(model.named_modules())
    candidates = _candidates(model)
    found: dict[str, LayerAdapter] = {}
    for pattern in targets or []:
        hits = [n for n in candidates if named_by(n, [pattern])]
        if not hits:
            raise RecipeError(
                f"recipe key `pruning.targets` pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"example module names: {', '.join(_example_names(model))}"
            )
        for hit in hits:
            name = candidates[hit]
            if not _matches((hit, name, plain_name(name)), ignore):
                found[name] = require_adapter(name, modules[name])
    if not targets:
        for name in set(candidates.values()):
            adapter = adapter_for(name, modules[name])
            if adapter is not None and not named_by(name, ignore):
                found[name] = adapter
    return dict(sorted(found.items()))


def _example_names(model: nn.Module, limit: int = 6) -> list[str]:
    modules = dict(model.named_modules())
    resolved = list(dict.fromkeys(_candidates(model).values()))
    names = [n for n in resolved if adapter_for(n, modules[n]) is not None]
    return names[:limit] or resolved[:limit]

"""`--set key=value` overrides of a recipe's `curvature:` section, shared by the gradual benchmarks.

`key=value` applies to every selected method, `method.key=value` (e.g. `fls.init=diagonal`) to one.
Values are parsed by the recipe's own `parse_overrides` (YAML: `true`, `16`, `kronecker`, `2:4`, and `1e-4` as a float).

Rows measured with overrides carry them in their name (`fls[damping=0.0001]`), so scan points sit
beside the defaults in one results file.
"""

from __future__ import annotations

from typing import Any

from fls_hf import RecipeError

# smoke runs (`--quick`) exercise the pipeline, not the estimate: the curvature keys a method has shrink to these
QUICK_CURVATURE = {
    "num_grads": 16,
    "init_examples": 16,
    "num_examples": 16,
    "warmup_steps": 1,
    "refinement_steps": 1,
    "num_batches": 1,
}


def quick_curvature(curvature: dict[str, Any]) -> dict[str, Any]:
    """`curvature` with every key of `QUICK_CURVATURE` it has set to the smoke-run value."""
    return {**curvature, **{k: v for k, v in QUICK_CURVATURE.items() if k in curvature}}


def parse_overrides(pairs: list[str], method: str) -> dict[str, Any]:
    """Overrides for `method`: `["damping=1e-4", "fls.init=diagonal"]` → {"damping": 0.0001, "init": "diagonal"}
    for fls."""
    from fls_hf.recipe import parse_overrides as parse_recipe_overrides  # here: it imports torch

    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        scope, dot, name = key.rpartition(".")
        if not sep or not name:
            raise SystemExit(f"--set expects key=value or method.key=value, got {pair!r}")
        if dot and scope != method:
            continue
        try:
            value = parse_recipe_overrides([f"{name}={text}"])[name]
        except RecipeError as error:
            raise SystemExit(f"--set {pair!r}: {error}") from error
        overrides[name] = value
    return overrides


def row_name(method: str, overrides: dict) -> str:
    return method + ("[" + ",".join(f"{k}={v}" for k, v in overrides.items()) + "]" if overrides else "")

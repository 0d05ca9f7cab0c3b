"""Exception hierarchy: every error raised for user input derives from `FlsError`."""

from __future__ import annotations


class FlsError(Exception):
    """Root of every error fls_hf raises on purpose."""


class RecipeError(FlsError, ValueError):
    """A recipe key is unknown, mistyped, out of range or inconsistent."""


class UnsupportedModuleError(FlsError, TypeError):
    """A targeted module has a type fls_hf cannot prune."""


class CurvatureError(FlsError, ValueError):
    """Curvature settings, state or inputs are unusable (damping <= 0, shape mismatch, memory budget, a model output
    without logits...)."""


class PruningStateError(FlsError, ValueError):
    """Saved pruner state is missing, truncated, unsafe or does not match the model."""


class DistributedError(FlsError, RuntimeError):
    """Ranks disagree (masks differ) or the parallel setup is not supported."""

"""fls_hf: the FishLeg Surgeon for Hugging Face models.

Public contract (see README): the trainer, callback and arguments, recipes, one-shot pruning, the
sparsity report, and shrinking a model whose FFN neurons / heads were pruned (`shrink`, `save_shrunk`).

The names below load on first use (PEP 562): `from fls_hf import oneshot` does not import the Trainer, whose
import pulls in PEFT and `datasets` through transformers (seconds per process, paid by every pruning child).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import CurvatureError, DistributedError, FlsError, PruningStateError, RecipeError, UnsupportedModuleError

if TYPE_CHECKING:
    from .callback import FishLegPruningCallback
    from .export.report import SparsityReport, sparsity_report
    from .model.structures import save_shrunk, shrink
    from .oneshot import oneshot
    from .recipe import PruningRecipe, load_recipe
    from .trainer import FishLegPruningArguments, FishLegPruningTrainer

__version__ = "0.1.0.dev0"

# public name → the module that defines it
_LAZY = {
    "FishLegPruningCallback": ".callback",
    "FishLegPruningArguments": ".trainer",
    "FishLegPruningTrainer": ".trainer",
    "PruningRecipe": ".recipe",
    "SparsityReport": ".export.report",
    "load_recipe": ".recipe",
    "oneshot": ".oneshot",
    "save_shrunk": ".model.structures",
    "shrink": ".model.structures",
    "sparsity_report": ".export.report",
}

__all__ = [
    "CurvatureError",
    "DistributedError",
    "FishLegPruningArguments",
    "FishLegPruningCallback",
    "FishLegPruningTrainer",
    "FlsError",
    "PruningRecipe",
    "PruningStateError",
    "RecipeError",
    "SparsityReport",
    "UnsupportedModuleError",
    "load_recipe",
    "oneshot",
    "save_shrunk",
    "shrink",
    "sparsity_report",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fls_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

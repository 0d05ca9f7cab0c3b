"""fls_hf: the FishLeg Surgeon for Hugging Face models.

Public contract (see README): the trainer, callback and arguments, recipes, one-shot pruning and the
sparsity report.
"""

from .callback import FishLegPruningCallback
from .errors import CurvatureError, DistributedError, FlsError, PruningStateError, RecipeError, UnsupportedModuleError
from .export.report import SparsityReport, sparsity_report
from .oneshot import oneshot
from .recipe import PruningRecipe, load_recipe
from .trainer import FishLegPruningArguments, FishLegPruningTrainer

__version__ = "0.1.0.dev0"

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
    "sparsity_report",
]

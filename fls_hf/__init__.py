"""fls_hf: the FishLeg Surgeon for Hugging Face models.

Public contract (see README): the trainer, callback and arguments, recipes, one-shot pruning, the
sparsity report, and shrinking a model whose FFN neurons / heads were pruned (`shrink`, `save_shrunk`).
"""

from .callback import FishLegPruningCallback
from .errors import CurvatureError, DistributedError, FlsError, PruningStateError, RecipeError, UnsupportedModuleError
from .export.report import SparsityReport, sparsity_report
from .model.structures import save_shrunk, shrink
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
    "save_shrunk",
    "shrink",
    "sparsity_report",
]

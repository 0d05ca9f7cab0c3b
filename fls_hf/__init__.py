"""fls_hf: the FishLeg Surgeon for Hugging Face models."""

from .errors import CurvatureError, FlsError, PruningStateError, RecipeError, UnsupportedModuleError

__version__ = "0.1.0.dev0"

__all__ = ["CurvatureError", "FlsError", "PruningStateError", "RecipeError", "UnsupportedModuleError"]

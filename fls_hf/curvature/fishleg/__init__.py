"""FishLeg: a structured Q(λ) ≈ (F + γI)⁻¹ learned by the auxiliary loss (config, provider, Q structures,
warm starts)."""

from .config import FishLegConfig
from .provider import FishLegProvider
from .structures import STRUCTURES, BlockDiagonalQ, DiagonalQ, KroneckerQ, build_structure, structure_numel

__all__ = [
    "STRUCTURES",
    "BlockDiagonalQ",
    "DiagonalQ",
    "FishLegConfig",
    "FishLegProvider",
    "KroneckerQ",
    "build_structure",
    "structure_numel",
]

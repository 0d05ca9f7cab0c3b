"""Inverse-Fisher providers behind one interface (`base.CurvatureProvider`) and one registry.

A method is a config dataclass plus a provider class, registered under its recipe name
(`pruning.method`): magnitude (Q = I/γ), diagonal_fisher (OBD), block_fisher (oBERT), kfac
((G ⊗ Ā + γI)⁻¹ with the row model OBC uses), fishleg, and taylor (first-order importance of
structures, a baseline for `mask_type: neurons`).
`register_curvature` adds a method of your own.
"""

from .base import (
    CurvatureProvider,
    RowModel,
    config_class_for,
    provider_class_for,
    register_curvature,
    registered_methods,
)
from .block_fisher import BlockFisherProvider
from .config import BlockFisherConfig, CurvatureConfig, DiagonalFisherConfig, GradientFisherConfig, KFACConfig
from .diagonal import DiagonalFisherProvider
from .fishleg import FishLegConfig, FishLegProvider
from .gradient_fisher import GradientFisherProvider
from .kfac import KFACProvider
from .magnitude import MagnitudeProvider
from .taylor import TaylorProvider

register_curvature("fishleg", FishLegProvider)
register_curvature("magnitude", MagnitudeProvider)
register_curvature("diagonal_fisher", DiagonalFisherProvider)
register_curvature("block_fisher", BlockFisherProvider)
register_curvature("kfac", KFACProvider)
register_curvature("taylor", TaylorProvider)

__all__ = [
    "BlockFisherConfig",
    "BlockFisherProvider",
    "CurvatureConfig",
    "CurvatureProvider",
    "DiagonalFisherConfig",
    "DiagonalFisherProvider",
    "FishLegConfig",
    "FishLegProvider",
    "GradientFisherConfig",
    "GradientFisherProvider",
    "KFACConfig",
    "KFACProvider",
    "MagnitudeProvider",
    "RowModel",
    "TaylorProvider",
    "config_class_for",
    "provider_class_for",
    "register_curvature",
    "registered_methods",
]

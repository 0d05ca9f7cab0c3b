"""Inverse-Fisher providers behind one interface (`base.CurvatureProvider`) and one registry.

A method is a config dataclass plus a provider class, registered under its recipe name
(`pruning.method`): magnitude (Q = I/γ), diagonal_fisher (OBD), block_fisher (oBERT) and fishleg.
`register_curvature` adds a method of your own.
"""

from .base import CurvatureProvider, config_class_for, provider_class_for, register_curvature, registered_methods
from .block_fisher import BlockFisherProvider
from .config import BlockFisherConfig, CurvatureConfig, DiagonalFisherConfig, GradientFisherConfig
from .diagonal import DiagonalFisherProvider
from .fishleg import FishLegConfig, FishLegProvider
from .gradient_fisher import GradientFisherProvider
from .magnitude import MagnitudeProvider

register_curvature("fishleg", FishLegProvider)
register_curvature("magnitude", MagnitudeProvider)
register_curvature("diagonal_fisher", DiagonalFisherProvider)
register_curvature("block_fisher", BlockFisherProvider)

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
    "MagnitudeProvider",
    "config_class_for",
    "provider_class_for",
    "register_curvature",
    "registered_methods",
]

"""Inverse-Fisher providers behind one interface (see `base.CurvatureProvider`), one registry."""

from .base import (
    CurvatureConfig,
    CurvatureProvider,
    config_class_for,
    provider_class_for,
    register_curvature,
    registered_methods,
)
from .block_fisher import BlockFisherConfig, BlockFisherProvider
from .diagonal import DiagonalFisherConfig, DiagonalFisherProvider
from .fishleg import FishLegConfig, FishLegProvider
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
    "MagnitudeProvider",
    "config_class_for",
    "provider_class_for",
    "register_curvature",
    "registered_methods",
]

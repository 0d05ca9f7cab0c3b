"""Inverse-Fisher providers behind one interface (see `base.CurvatureProvider`), one registry."""

from .base import (
    CurvatureConfig,
    CurvatureProvider,
    config_class_for,
    provider_class_for,
    register_curvature,
    registered_methods,
)
from .fishleg import FishLegConfig, FishLegProvider
from .magnitude import MagnitudeProvider

register_curvature("fishleg", FishLegProvider)
register_curvature("magnitude", MagnitudeProvider)

__all__ = [
    "CurvatureConfig",
    "CurvatureProvider",
    "FishLegConfig",
    "FishLegProvider",
    "MagnitudeProvider",
    "config_class_for",
    "provider_class_for",
    "register_curvature",
    "registered_methods",
]

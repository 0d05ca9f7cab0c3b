"""Inverse-Fisher providers behind one interface (see `base.CurvatureProvider`), one registry."""

from .base import (
    CurvatureConfig,
    CurvatureProvider,
    config_class_for,
    provider_class_for,
    register_curvature,
    registered_methods,
)
from .magnitude import MagnitudeProvider

register_curvature("magnitude", MagnitudeProvider)

__all__ = [
    "CurvatureConfig",
    "CurvatureProvider",
    "MagnitudeProvider",
    "config_class_for",
    "provider_class_for",
    "register_curvature",
    "registered_methods",
]

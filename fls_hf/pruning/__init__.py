"""Pruning: keep-masks, mask patterns and selection, sparsity schedules, the OBS surgeon and the `Pruner`
(the lifecycle that drives one curvature provider through a recipe's schedule)."""

from .masks import MaskSet
from .patterns import MaskPattern, parse_mask_type, select_pruned
from .pruner import Pruner
from .schedule import SparsitySchedule, recomputation_targets
from .surgeon import independent_compensation, joint_block_compensation, obd_saliency, obs_saliency, prune_step

__all__ = [
    "MaskPattern",
    "MaskSet",
    "Pruner",
    "SparsitySchedule",
    "independent_compensation",
    "joint_block_compensation",
    "obd_saliency",
    "obs_saliency",
    "parse_mask_type",
    "prune_step",
    "recomputation_targets",
    "select_pruned",
]

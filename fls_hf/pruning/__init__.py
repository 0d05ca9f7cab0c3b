"""Pruning: keep-masks, mask patterns and selection, sparsity schedules, and the OBS surgeon."""

from .masks import MaskSet
from .patterns import MaskPattern, parse_mask_type, select_pruned
from .schedule import SparsitySchedule, recomputation_targets
from .surgeon import independent_compensation, joint_block_compensation, obd_saliency, obs_saliency, prune_step

__all__ = [
    "MaskPattern",
    "MaskSet",
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

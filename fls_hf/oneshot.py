"""Post-training pruning from calibration data: `oneshot(model, dataloader, recipe)`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .export.report import SparsityReport, sparsity_report
from .pruning.pruner import Pruner
from .recipe import PruningRecipe, load_recipe


def oneshot(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    recipe: PruningRecipe | Mapping[str, Any] | str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> SparsityReport:
    """Prune a trained model in place to the recipe's `final_sparsity` and return the sparsity report.

    Curvature is estimated (baselines) or warmed up (FishLeg: `curvature.warmup_steps` aux steps, with a
    progress bar) on batches from `dataloader`; `pruning.recomputations` > 1 prunes in that many stages
    with a curvature update between them. Labels in the batches are not needed.

    Example:
        >>> report = oneshot(model, calibration_loader, "recipes/oneshot-unstructured-50.yaml")
        >>> print(report.to_markdown())
    """
    recipe = load_recipe(recipe, overrides=overrides)
    pruner = Pruner(model, recipe)
    pruner.prune_to(model, recipe.pruning.final_sparsity, dataloader)
    return sparsity_report(model, recipe)

"""What a pruned model folder holds beside the weights: `recipe.yaml` and `sparsity_report.json`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .recipe import PruningRecipe
from .report import SparsityReport, sparsity_report

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "sparsity_report.json"


def write_pruning_artifacts(model: nn.Module, recipe: PruningRecipe, output_dir: str | Path) -> SparsityReport:
    """Write the recipe and the exact sparsity report next to a saved model; returns the report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    recipe.save(output_dir / RECIPE_FILE)
    report = sparsity_report(model, recipe)
    report.save(output_dir / REPORT_FILE)
    return report

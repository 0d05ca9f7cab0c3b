"""What a pruned model folder holds beside the weights: `recipe.yaml`, `sparsity_report.json` and, from the
trainer, `training_args.json` (transformers' `training_args.bin` is a pickle; fls_hf never loads it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..recipe import PruningRecipe
from .report import SparsityReport, sparsity_report

if TYPE_CHECKING:  # importing it pulls in PEFT through transformers' trainer_utils: seconds per process
    from transformers import TrainingArguments

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "sparsity_report.json"
TRAINING_ARGS_FILE = "training_args.json"


def write_pruning_artifacts(
    model: nn.Module, recipe: PruningRecipe, output_dir: str | Path, *, write: bool = True
) -> SparsityReport:
    """Write the recipe and the exact sparsity report next to a saved model; returns the report. Under FSDP every
    rank must call it (the report sums over the shards), with `write` on the one that saves."""
    report = sparsity_report(model, recipe)
    if write:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe.save(output_dir / RECIPE_FILE)
        report.save(output_dir / REPORT_FILE)
    return report


def write_training_args(args: TrainingArguments, output_dir: str | Path) -> Path:
    """The training arguments as JSON (`*_token` values redacted by transformers), readable without unpickling."""
    path = Path(output_dir) / TRAINING_ARGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(args.to_json_string())
    return path

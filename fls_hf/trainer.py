"""`FishLegPruningTrainer` and `FishLegPruningArguments`: swap one class name, pass a recipe.

The trainer overrides public hooks only (`__init__`, `save_model`, `log`); the training loop itself
is transformers' own, driven through `FishLegPruningCallback`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments

from .callback import FishLegPruningCallback
from .errors import RecipeError
from .export import write_pruning_artifacts
from .pruner import Pruner
from .recipe import PruningRecipe, load_recipe, parse_overrides


@dataclass
class FishLegPruningArguments(TrainingArguments):
    """`TrainingArguments` plus the pruning recipe; parseable by `HfArgumentParser` (CLI, JSON, YAML)."""

    recipe: str | None = field(default=None, metadata={"help": "Path to a pruning recipe (YAML), e.g. recipes/gradual-unstructured-90.yaml."})
    recipe_args: list[str] | None = field(
        default=None, metadata={"help": "Recipe overrides as dotted key=value, e.g. pruning.final_sparsity=0.8 curvature.damping=1e-4."}
    )

    def recipe_overrides(self) -> dict[str, Any]:
        if isinstance(self.recipe_args, dict):  # a JSON / YAML config may give a mapping directly
            return dict(self.recipe_args)
        return parse_overrides(self.recipe_args or [])


class FishLegPruningTrainer(Trainer):
    """A `transformers.Trainer` that prunes with the FishLeg Surgeon while it trains.

    Args:
        recipe: a `PruningRecipe`, a YAML path / string or a dict; defaults to `args.recipe`
            (with `args.recipe_args` overrides) when `args` is a `FishLegPruningArguments`.
        *args, **kwargs: everything `transformers.Trainer` takes.

    Example:
        >>> trainer = FishLegPruningTrainer(model=model, args=args, recipe="recipes/gradual-unstructured-90.yaml",
        ...                                 train_dataset=train, eval_dataset=dev, processing_class=tokenizer)
        >>> trainer.train(); trainer.save_model("out")   # weights with zeros + recipe.yaml + sparsity_report.json
    """

    def __init__(self, *args: Any, recipe: PruningRecipe | dict | str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        overrides = self.args.recipe_overrides() if isinstance(self.args, FishLegPruningArguments) else {}
        recipe = recipe if recipe is not None else getattr(self.args, "recipe", None)
        if recipe is None:
            raise RecipeError("FishLegPruningTrainer needs a recipe: pass `recipe=` or set `--recipe` in FishLegPruningArguments")
        self.pruning_callback = FishLegPruningCallback(load_recipe(recipe, overrides=overrides))
        # First in line, so the reporting callbacks after it see the sparsity it adds to the logs.
        self.callback_handler.callbacks.insert(0, self.pruning_callback)

    @property
    def recipe(self) -> PruningRecipe:
        return self.pruning_callback.recipe

    @property
    def pruner(self) -> Pruner | None:
        return self.pruning_callback.pruner

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Plain HF weights (pruned weights are exact zeros) plus `recipe.yaml` and `sparsity_report.json`."""
        if self.pruner is not None:
            self.pruner.enforce_masks()
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_pruning_artifacts(self.model, self.recipe, output_dir or self.args.output_dir)

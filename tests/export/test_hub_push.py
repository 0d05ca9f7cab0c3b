"""`--push_to_hub` in examples/text_classification.py and `FishLegPruningTrainer.push_to_hub`, offline:
everything up to the network call; the model card is the trainer's own (`create_model_card`).

transformers 5's `Trainer.push_to_hub` saves the model, writes the model card (`create_model_card`),
then calls `hf_api().upload_folder(folder_path=args.output_dir, ...)` (`transformers.utils.hub.hf_api`
returns a shared `huggingface_hub.HfApi`). Only the Hub calls are replaced: `HfApi.upload_folder`
copies what it would upload (its ignore patterns applied) into a local folder, and `HfApi.create_repo`
(which `--push_to_hub` calls when the Trainer is built) answers with the repo URL.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast

from fls_hf import load_recipe, sparsity_report
from fls_hf.export.card import CARD_TAGS

from helpers import tiny_bert

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "the a an and of to is it this that film movie story good bad great funny dull boring best worst not no "
    "very too more most so but with for as on in its one all like just all-time love hate fun mess charm well "
    "make makes made characters plot script acting director comedy drama , . ' ! ?"
).split()


def load_example():
    spec = importlib.util.spec_from_file_location(
        "text_classification_example", REPO / "examples" / "text_classification.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def tiny_checkpoint(folder: Path) -> Path:
    """A tiny BERT (tests/helpers.py) with a 64-token WordPiece vocabulary, saved like a Hub checkpoint."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    vocab = (vocab + [f"[unused{i}]" for i in range(64)])[:64]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=32).save_pretrained(
        folder
    )
    tiny_bert().save_pretrained(folder)
    return folder


class FakeHub:
    """Stands in for the Hub: records the calls and keeps a copy of every uploaded folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.uploads, self.repos = root, [], []

    def create_repo(self, api, repo_id, *args, **kwargs):
        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(
        self, api, *, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, path_in_repo=None, **kwargs
    ):
        target = self.root / f"upload-{len(self.uploads)}"
        files = [p.relative_to(folder_path).as_posix() for p in sorted(Path(folder_path).rglob("*")) if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder_path) / name, target / name)
        self.uploads.append(
            {"repo_id": repo_id, "folder": target, "files": sorted(p.name for p in target.iterdir()), **kwargs}
        )
        return f"https://huggingface.co/{repo_id}/commit/fake"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, *a, **k: hub.create_repo(api, repo_id, *a, **k))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, *a, **k: hub.upload_folder(api, *a, **k))
    return hub


def test_push_to_hub_uploads_a_complete_pruned_folder(tmp_path, fake_hub, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    metrics = load_example().main(
        [
            "--model_name_or_path",
            str(checkpoint),
            "--output_dir",
            str(out),
            "--use_cpu",
            "--seed",
            "0",
            "--push_to_hub",
            "--hub_model_id",
            "someone/tiny-pruned",
            "--hub_token",
            "not-a-token",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "32",
            "--max_seq_length",
            "32",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-3",
            "--disable_tqdm",
            "true",
            "--logging_steps",
            "1",
            "--recipe_args",
            "pruning.start_step=0",
            "pruning.end_step=2",
            "pruning.update_frequency=1",
            "pruning.final_sparsity=0.6",
            "curvature.num_batches=1",
            "curvature.num_examples=8",
        ]
    )
    assert fake_hub.repos == ["someone/tiny-pruned"]
    assert len(fake_hub.uploads) == 1, "push_to_hub must upload once, after saving and writing the card"
    upload = fake_hub.uploads[0]
    assert upload["repo_id"] == "someone/tiny-pruned" and upload["token"] == "not-a-token"
    assert upload["commit_message"] == "End of training"
    folder = upload["folder"]
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "recipe.yaml",
        "sparsity_report.json",
        "README.md",
    ):
        assert name in upload["files"], name
    assert not any(name.startswith(("_", "checkpoint-")) for name in upload["files"])

    # The uploaded copy is a plain transformers checkpoint with the pruned weights as exact zeros.
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    recipe = load_recipe(folder / "recipe.yaml")
    assert recipe.pruning.final_sparsity == 0.6
    report = sparsity_report(model, recipe)
    assert report.global_sparsity == pytest.approx(0.6, abs=1e-3) and report.zeros == round(0.6 * report.numel)
    assert metrics["eval_sparsity"] == pytest.approx(report.global_sparsity)

    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(re.match(r"\A---\n(.*?)\n---\n", card, re.DOTALL).group(1))
    assert set(CARD_TAGS) <= set(meta["tags"]) and meta["library_name"] == "transformers"
    assert "base_model" not in meta  # a local checkpoint path is not a Hub id
    assert meta["datasets"] == ["vader-movie-review-snippets"] and meta["metrics"] == ["accuracy"]
    assert report.to_markdown() in card
    assert 'from_pretrained("someone/tiny-pruned")' in card and "## Training procedure" in card
    assert re.search(r"pruned accuracy after fine-tuning at 60\.0\d % sparsity: \d\.\d{4}", capsys.readouterr().out)


def test_trainer_push_to_hub_uploads_its_own_card(tmp_path, fake_hub):
    """`FishLegPruningTrainer.create_model_card` (called by `push_to_hub`) writes the fls_hf card (no subclass)."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from fls_hf import FishLegPruningTrainer

    ids = torch.randint(1, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > 32).long().tolist()})
    recipe = {
        "pruning": {
            "method": "magnitude",
            "targets": [r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)$"],
            "ignore": ["classifier", "re:.*pooler.*"],
            "final_sparsity": 0.5,
        }
    }
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        push_to_hub=True,
        hub_model_id="someone/tiny-trainer",
        hub_token="not-a-token",
    )
    trainer = FishLegPruningTrainer(model=tiny_bert(), args=args, recipe=recipe, train_dataset=data, eval_dataset=data)
    trainer.train()
    evaluation = trainer.evaluate()
    assert "sparsity" not in evaluation
    trainer.push_to_hub(dataset="tiny-tokens", license="mit")

    folder = fake_hub.uploads[-1]["folder"]
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(re.match(r"\A---\n(.*?)\n---\n", card, re.DOTALL).group(1))
    assert set(CARD_TAGS) | {"generated_from_trainer"} <= set(meta["tags"])
    assert meta["license"] == "mit" and meta["datasets"] == ["tiny-tokens"]
    report = sparsity_report(
        AutoModelForSequenceClassification.from_pretrained(folder), load_recipe(folder / "recipe.yaml")
    )
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-3) and report.to_markdown() in card
    assert "# model pruned to 50 % sparsity with the FishLeg Surgeon" in card  # not the repo name push_to_hub passes
    assert f"| eval_loss | {evaluation['eval_loss']:.4f} |" in card  # from the log history
    assert 'from_pretrained("someone/tiny-trainer")' in card and "## Training procedure" in card

    trainer.create_model_card(model_name="Tiny pruned BERT", metrics={"eval_accuracy": 0.75})
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# Tiny pruned BERT" in card and "| eval_accuracy | 0.7500 |" in card and "eval_loss" not in card

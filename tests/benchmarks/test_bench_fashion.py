"""B3 smoke tests: `python -m benchmarks.fashion_autoencoder --quick` (and fashion_resnet) on the Debian Fashion-MNIST
files, in this process (runpy, state put back: `helpers.run_in_process`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import fashion_data

from helpers import run_quick_study

REPO = Path(__file__).resolve().parents[2]

needs_data = pytest.mark.skipif(
    not fashion_data.available(),
    reason=f"Fashion-MNIST idx files not in {fashion_data.data_dir()}: `apt-get install -y dataset-fashion-mnist` "
    "(.ci/run does)",
)


def test_read_idx_round_trip(tmp_path):
    """The idx parser reads back what the format says, and refuses a truncated file."""
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">i4").tobytes()
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(header + pixels.tobytes())
    assert np.array_equal(fashion_data.read_idx(path), pixels)
    path.write_bytes(header + pixels.tobytes()[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        fashion_data.read_idx(path)


@needs_data
def test_splits_shapes_and_range():
    data = fashion_data.splits(validation=5000, seed=0)
    assert {k: v.shape for k, v in data.items()} == {
        "train": (55000, 784),
        "validation": (5000, 784),
        "test": (10000, 784),
    }
    assert all(v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1 for v in data.values())


@needs_data
@pytest.mark.slow
def test_quick_benchmark_writes_finite_monotone_losses(tmp_path):
    report, _ = run_quick_study("fashion_autoencoder", tmp_path / "quick.json", in_process=True)
    assert math.isfinite(report["dense"]["test"]) and report["dense"]["test"] > 0
    rows = {row["method"]: row for row in report["methods"]}
    assert "magnitude" in rows and any(name.startswith("fls-diag") for name in rows)
    for row in rows.values():
        assert set(row["results"]) == {"0.5", "0.9"}
        for target, measured in row["results"].items():
            assert math.isfinite(measured["test"]) and math.isfinite(measured["validation"])
            assert measured["sparsity"] == pytest.approx(float(target), abs=1e-3)
    magnitude = rows["magnitude"]["results"]
    assert magnitude["0.9"]["test"] >= magnitude["0.5"]["test"]


def test_labelled_splits_keep_the_image_order_of_splits():
    if not fashion_data.available():
        pytest.skip("Fashion-MNIST not installed")
    pixels = fashion_data.splits(validation=1000, seed=3, limit=200)
    pairs = fashion_data.labelled_splits(validation=1000, seed=3, limit=200)
    for name, (x, y) in pairs.items():
        assert np.array_equal(x, pixels[name]) and y.shape == (200,) and y.dtype == np.int64
        assert 0 <= y.min() and y.max() <= 9
    assert np.bincount(fashion_data.labels("test"), minlength=10).tolist() == [1000] * 10


@needs_data
@pytest.mark.slow
def test_resnet_quick_prunes_convolutions_to_95_percent(tmp_path):
    report, _ = run_quick_study("fashion_resnet", tmp_path / "resnet.json", in_process=True)
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"gmp", "fls"}
    for row in rows.values():
        assert row["sparsity"] == pytest.approx(0.95, abs=1e-3)
        assert 0.0 <= row["validation"] <= 1.0 and 0.0 <= row["test"] <= 1.0
    assert rows["fls"]["curvature_gib"] > 0 == rows["gmp"]["curvature_gib"]
    assert report["dense"]["train_seconds"] > 0

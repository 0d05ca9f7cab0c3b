"""Where the benchmarks keep their files: results (committed) and dense-model caches (not committed)."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
CACHE = BENCHMARKS / "cache"

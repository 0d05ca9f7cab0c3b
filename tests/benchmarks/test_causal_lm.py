"""`python -m benchmarks.causal_lm --quick` on the fls_hf side only: no peers' interpreter, as in CI (issue 17)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import run_in_process

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prunes_the_llama_projections_and_skips_missing_peers(tmp_path):
    out = tmp_path / "causal_lm.json"
    missing = tmp_path / "no-venv" / "bin" / "python"
    command = ["benchmarks.causal_lm", "--quick", "--output", str(out), "--peers", str(missing)]
    done = run_in_process(command, REPO)  # no process start: the torch and transformers imports are paid already
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"peers: skipped, no interpreter at {missing}" in done.stdout
    report = json.loads(out.read_text())
    rows = {(row["method"], row["pattern"]): row for row in report["rows"]}
    expected = {(m, p) for m in ("magnitude", "fls kfac+obc, 1 round") for p in ("unstructured", "2:4")}
    assert set(rows) == expected | {("fls kfac+obc, 1 round, 50 % per layer", "unstructured")}
    for row in rows.values():
        assert row["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert math.isfinite(row["validation"]) and math.isfinite(row["test"]) and row["chosen"]
    assert rows["fls kfac+obc, 1 round", "2:4"]["recipe"]["pruning"]["compensation"] == "obc"
    assert 1 < report["dense"]["test"] < report["settings"]["vocab_size"]
    assert "| fls kfac+obc, 1 round |" in done.stdout and "llm-compressor" not in report["table"]

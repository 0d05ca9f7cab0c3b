"""`python -m benchmarks.gradual_cost --quick`: time and memory of gradual pruning in the Trainer against a plain
fine-tune, each run in its own process (issue 18)."""

import math

import pytest

from helpers import run_quick_study


def test_quick_run_times_every_run_and_reaches_the_target(tmp_path):
    report, done = run_quick_study("gradual_cost", tmp_path / "cost.json", timeout=300)
    assert report["settings"]["shape"] == "quick" and report["settings"]["steps"] == 12
    rows = {row["run"]: row for row in report["rows"]}
    assert set(rows) == {"fine-tune", "shipped-90"}
    for run, row in rows.items():
        assert "error" not in row, row
        assert row["wall_seconds"] > 0 and row["cpu_seconds"] > 0 and math.isfinite(row["peak_growth_bytes"])
        if run != "fine-tune":
            assert row["sparsity"] == pytest.approx(0.9, abs=1e-4), run  # the schedule ends at half the steps
    shipped = rows["shipped-90"]["recipe"]["pruning"]
    assert (shipped["method"], shipped["compensation"], shipped["update_frequency"]) == ("kfac", "auto", 1)
    assert rows["fine-tune"]["recipe"] is None
    assert "| shipped-90 |" in done.stdout and "1.00×" in report["table"]

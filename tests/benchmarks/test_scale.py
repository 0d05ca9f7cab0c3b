"""`python -m benchmarks.scale --quick`: memory and time of one-shot pruning per method, each in its own process
(issue 18)."""

import math

from helpers import run_quick_study

METHODS = ("magnitude", "fls-diagonal", "kfac-obc")


def test_quick_run_measures_every_method_at_exactly_half_the_targeted_weights(tmp_path):
    report, done = run_quick_study("scale", tmp_path / "scale.json", timeout=300)
    settings = report["settings"]
    assert settings["shape"] == "quick" and settings["device"] == "cpu" and settings["sparsity"] == 0.5
    assert settings["targeted_layers"] == 14 and 0 < settings["targeted_weights"] < settings["parameters"]
    assert settings["calibration_tokens"] == settings["batches"] * settings["batch_size"] * settings["seq_len"]
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        assert "error" not in row, row
        assert row["targeted_weights"] == settings["targeted_weights"]
        assert row["zeros"] == row["expected_zeros"] == round(0.5 * row["targeted_weights"]), method
        assert row["sparsity"] == 0.5
        for key in ("peak_growth_bytes_per_weight", "growth_over_prior_peak_bytes_per_weight"):
            assert math.isfinite(row[key]) and row[key] > 0, (method, key, row[key])
        assert row["wall_seconds"] > 0 and row["cpu_seconds"] >= 0 and row["forward_backward_seconds"] > 0
        assert {"setup", "selection", "saliency+update", "finish"} <= set(row["phases"])
    assert "statistics" in rows["fls-diagonal"]["phases"] and "statistics" in rows["kfac-obc"]["phases"]
    assert "statistics" not in rows["magnitude"]["phases"]  # magnitude takes no curvature pass
    assert rows["kfac-obc"]["recipe"]["pruning"]["compensation"] == "obc"
    assert rows["fls-diagonal"]["recipe"]["curvature"]["warmup_steps"] == 0
    assert "| kfac-obc |" in done.stdout and report["table"] in done.stdout

"""`python -m benchmarks.scale --quick`: memory and time of one-shot pruning per method, each in its own process
(issue 18)."""

import math

import pytest

from helpers import run_quick_study

METHODS = ("magnitude", "fls-diagonal", "kfac-obc")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run_quick_study("scale", tmp_path_factory.mktemp("scale") / "scale.json", 300)


def test_quick_run_measures_every_method_at_exactly_half_the_targeted_weights(quick_run):
    report, done = quick_run
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


def test_quick_fsdp_run_gives_each_rank_its_rows_and_less_curvature_than_one_process(tmp_path, quick_run):
    """`--world_size 2` (issue 19): two CPU ranks hold the model sharded by rows; each rank's row reports its own
    memory, and its curvature (diag G rows) and masks are smaller than one process's, at the exact global target."""
    sharded, done = run_quick_study(
        "scale", tmp_path / "two.json", 300, "--methods", "kfac-obc", "--world_size", "2"
    )  # one method: magnitude under FSDP is tested to the masks in tests/test_fsdp.py
    assert sharded["settings"]["world_size"] == 2
    rows = sharded["rows"]
    assert sorted((r["method"], r["rank"]) for r in rows) == [("kfac-obc", 0), ("kfac-obc", 1)]
    whole = next(r for r in quick_run[0]["rows"] if r["method"] == "kfac-obc")
    for row in rows:
        assert "error" not in row, row
        assert row["zeros"] == row["expected_zeros"] == round(0.5 * row["targeted_weights"])
        assert row["local_targeted_weights"] < row["targeted_weights"]
        assert row["mask_bytes"] == row["local_targeted_weights"]
    kfac = [r for r in rows if r["method"] == "kfac-obc"]
    assert sum(r["mask_bytes"] for r in kfac) == whole["mask_bytes"]
    assert all(r["curvature_bytes"] < whole["curvature_bytes"] for r in kfac)  # Ā replicated, G's rows split
    assert "(rank 1 of 2)" in done.stdout


def test_a_failed_child_keeps_its_error_when_its_progress_file_is_missing_or_cut_off(tmp_path):
    """A child killed mid-write (or two ranks once sharing one file: the CI failure of 2026-12-01) must not crash the
    parent: the row keeps the error, and the finished phases only when their file is whole."""
    import json

    from benchmarks.scale import Meter, failed_row, partial_file

    out = tmp_path / "row.rank0.json"
    assert failed_row("kfac-obc", "exit status -6", partial_file(out)) == {
        "method": "kfac-obc",
        "error": "exit status -6",
    }
    meter = Meter(torch_device("cpu"), progress=partial_file(out))
    meter.start()
    with meter.phase("statistics"):  # killed here
        whole = partial_file(out).read_text()
        row = failed_row("kfac-obc", "exit status -6", partial_file(out))
    assert row["error"] == "exit status -6, in oneshot phase statistics"
    assert row["partial"] == json.loads(whole) and "setup" in row["partial"]["phases"]
    partial_file(out).write_text(whole + whole)  # what two writers left in one file
    assert failed_row("kfac-obc", "exit status -6", partial_file(out)) == {
        "method": "kfac-obc",
        "error": "exit status -6",
    }
    partial_file(out).write_text(whole[: len(whole) // 2])
    assert "partial" not in failed_row("kfac-obc", "exit status -6", partial_file(out))
    tail = "terminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
    assert failed_row("kfac-obc", "exit status -6", partial_file(out), stderr_tail=tail)["stderr_tail"] == tail


def torch_device(kind: str):
    import torch

    return torch.device(kind)

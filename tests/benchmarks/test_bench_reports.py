"""The gradual benchmarks' report steps: Markdown table and PNG from a results file (real files, subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import run_in_process

REPO = Path(__file__).resolve().parents[2]


def rows(names_and_tests):
    return [
        {
            "method": name,
            "seed": seed,
            "sparsity": 0.9,
            "validation": acc - 0.01,
            "test": acc,
            "train_seconds": 100.0 + seed,
            "peak_rss_gib": 1.0,
            "curvature_gib": 0.1,
        }
        for name, seed, acc in names_and_tests
    ]


def gradual_report(path: Path, runs: list[dict]) -> str:
    """Write a 90 % results file with these runs and return what benchmarks.report_gradual prints for it."""
    path.write_text(json.dumps({"settings": {"sparsity": 0.9, "epochs": 1}, "rows": runs}))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.report_gradual", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_gradual_report_averages_seeds_and_plots_scan_points(tmp_path):
    path = tmp_path / "gradual.json"
    report = gradual_report(
        path, rows([("finetune", 0, 0.85), ("fls", 0, 0.78), ("fls", 1, 0.80), ("fls[rewarm=True]", 0, 0.81)])
    )
    assert "| fls | 2 | 90.0 % | 78.00 ± 1.00 | 79.00 ± 1.00 | 100 s | 1.00× | – |" in report
    assert "| fls[rewarm=True] | 1 |" in report
    assert path.with_suffix(".png").stat().st_size > 10_000


def test_gradual_report_times_each_run_against_the_fine_tune_of_its_own_checkpoint(tmp_path):
    """Sessions run at different machine speeds: a 2× slower session's runs must not look 2× costlier."""
    runs = rows([("finetune", 0, 0.85), ("finetune", 0, 0.85), ("gmp", 0, 0.7), ("gmp", 0, 0.7), ("obd", 0, 0.75)])
    for run, checkpoint, seconds in zip(
        runs, ("old", "new", "old", "new", "unknown"), (100.0, 200.0, 150.0, 300.0, 120.0)
    ):
        run.update(dense_checkpoint=checkpoint, train_seconds=seconds)
    report = gradual_report(tmp_path / "gradual.json", runs)
    assert "| 225 s | 1.50× | – |" in report  # gmp: 150/100 and 300/200; no CPU times recorded
    assert "| 120 s | – | – |" in report  # obd: no fine-tune on its checkpoint to compare with


def test_gradual_report_gives_the_cpu_time_ratio_where_runs_recorded_it(tmp_path):
    runs = rows([("finetune", 0, 0.85), ("fls", 0, 0.8), ("fls", 0, 0.8), ("gmp", 0, 0.7)])
    for run, cpu in zip(runs, (400.0, 480.0, None, None)):
        if cpu is not None:
            run["train_cpu_seconds"] = cpu
    report = gradual_report(tmp_path / "gradual.json", runs)
    assert (
        "| fls | 2 | 90.0 % | 79.00 ± 0.00 | 80.00 ± 0.00 | 100 s | 1.00× | 1.20× |" in report
    )  # the run that has a CPU time
    assert "| gmp | 1 | 90.0 % | 69.00 | 70.00 | 100 s | 1.00× | – |" in report


def test_resnet_report_prints_the_dense_line_and_each_method(tmp_path):
    path = tmp_path / "resnet.json"
    data = {
        "settings": {"sparsity": 0.95},
        "dense": {"validation": 0.91, "test": 0.9, "train_seconds": 400.0},
        "rows": rows(
            [("gmp", 0, 0.87), ("fls[rewarm=True,aux_lr=0.01]", 0, 0.868), ("fls[rewarm=True,aux_lr=0.01]", 1, 0.872)]
        ),
    }
    path.write_text(json.dumps(data))
    done = run_in_process(["benchmarks.fashion_resnet", "--report", str(path)], REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dense: validation 91.00 %, test 90.00 %" in done.stdout
    assert "| fls[rewarm=True,aux_lr=0.01] | 2 | 90.0 % | 86.00 ± 0.20 | 87.00 ± 0.20 |" in done.stdout
    assert path.with_suffix(".png").stat().st_size > 10_000


def oneshot_row(name, validation, test):
    return {
        "method": name,
        "curvature_seconds": 10.0,
        "curvature_gib": 2.0,
        "results": {
            s: {"validation": v, "test": t, "sparsity": float(s)} for s, v, t in zip(("0.5", "0.7"), validation, test)
        },
    }


def test_oneshot_report_picks_each_sparsitys_variant_on_validation_not_test(tmp_path):
    path = tmp_path / "oneshot.json"
    path.write_text(
        json.dumps(
            {
                "dense": {"validation": 0.86, "test": 0.857},
                "methods": [
                    oneshot_row("obert-1e-6", (0.85, 0.80), (0.84, 0.83)),  # best validation at 50 %
                    oneshot_row("obert-1e-7", (0.84, 0.82), (0.86, 0.81)),  # best test at 50 %, best validation at 70 %
                ],
            }
        )
    )
    plot = tmp_path / "oneshot.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.report_oneshot",
            str(path),
            "--pick",
            "obert=obert-1e-6,obert-1e-7",
            "--plot",
            str(plot),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    test_table = done.stdout.split("### Validation")[0]
    assert "| obert | 84.00 (obert-1e-6) | 81.00 (obert-1e-7) |" in test_table
    assert plot.stat().st_size > 10_000


def test_oneshot_report_names_a_variant_it_has_no_results_for(tmp_path):
    path = tmp_path / "oneshot.json"
    path.write_text(
        json.dumps(
            {
                "dense": {"validation": 0.86, "test": 0.857},
                "methods": [oneshot_row("obert-1e-6", (0.8, 0.8), (0.8, 0.8))],
            }
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.report_oneshot",
            str(path),
            "--pick",
            "obert=obert-1e-6,obert-1e-9",
            "--plot",
            str(tmp_path / "p.png"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "obert-1e-9" in done.stderr


def test_gradual_rows_replace_a_rerun_but_keep_another_dense_checkpoints_row(tmp_path):
    from benchmarks.common.rows import record

    out = tmp_path / "gradual.json"
    report = {"settings": {}, "rows": rows([("fls", 0, 0.78)])}  # an old row: no dense_checkpoint field
    record(report, {**rows([("fls", 0, 0.79)])[0], "dense_checkpoint": "abc"}, out)
    record(report, {**rows([("fls", 0, 0.80)])[0], "dense_checkpoint": "abc"}, out)  # re-measured: replaces
    stored = json.loads(out.read_text())["rows"]
    assert [(r.get("dense_checkpoint"), r["test"]) for r in stored] == [(None, 0.78), ("abc", 0.80)]


def test_adding_rows_keeps_a_results_files_note_and_takes_the_new_settings(tmp_path):
    from benchmarks.common.rows import open_report, record

    out = tmp_path / "gradual.json"
    out.write_text(json.dumps({"settings": {"seeds": "0"}, "rows": rows([("fls", 0, 0.78)]), "note": "session 25"}))
    report = open_report(out, {"seeds": "1"})
    record(report, rows([("fls", 1, 0.79)])[0], out)
    stored = json.loads(out.read_text())
    assert stored["note"] == "session 25" and stored["settings"] == {"seeds": "1"}
    assert [r["seed"] for r in stored["rows"]] == [0, 1]
    assert open_report(out, {}, fresh=True) == {"settings": {}, "rows": []}  # --quick: a smoke run starts empty


def test_structured_report_averages_each_share_and_start_and_plots_four_panels(tmp_path):
    """Issue 20's summary (benchmarks.report_structured) from result files: one-shot per kind, gradual per start; a
    start with no file is left out of the table and drawn empty. Gradual group OBS runs of the old files are the rule
    before the bias; a `_bias.json` beside them adds the shipped rule's runs from the same start only."""
    from benchmarks import report_structured

    (tmp_path / "oneshot_structured_bias.json").write_text(
        json.dumps(
            {
                "dense": {"validation": 0.85, "test": 0.86},
                "methods": [
                    {"method": "neurons-kfac", "results": {"0.5": {"validation": 0.85, "test": 0.855}}},
                    {"method": "neurons-kfac[no bias]", "results": {"0.5": {"validation": 0.84, "test": 0.845}}},
                    {"method": "neurons-taylor", "results": {"0.5": {"validation": 0.83, "test": 0.84}}},
                    {"method": "heads-magnitude", "results": {"0.9": {"validation": 0.5, "test": 0.51}}},
                    {"method": "neurons-kfac-emp", "results": {"0.5": {"validation": 0.1, "test": 0.1}}},
                ],
            }
        )
    )
    gradual = {
        50: [("finetune", 0.852, 0.858), ("fls-obc-rel-uniform", 0.86, 0.85), ("fls-obc-rel-uniform", 0.85, 0.86)],
        75: [("taylor-uniform", 0.84, 0.83), ("fls-obc-rel-uniform[max_full_g_rows=0]", 0.1, 0.1)],
    }
    for share, runs in gradual.items():
        rows = [{"method": m, "validation": v, "test": t, "dense_checkpoint": "abc"} for m, v, t in runs]
        (tmp_path / f"gradual_minilm_{share}_neurons.json").write_text(json.dumps({"rows": rows}))
    shipped = [("abc", 0.87, 0.86), ("other", 0.2, 0.2)]  # a re-run from another dense checkpoint: left out
    rows = [{"method": "fls-obc-rel-uniform", "validation": v, "test": t, "dense_checkpoint": c} for c, v, t in shipped]
    (tmp_path / "gradual_minilm_50_neurons_bias.json").write_text(json.dumps({"rows": rows}))
    with_heads = [{"method": "fls-obc-rel-uniform", "validation": 0.83, "test": 0.82}]
    (tmp_path / "gradual_minilm_50_neurons+heads25_pretrained.json").write_text(json.dumps({"rows": with_heads}))
    lines = report_structured.table(tmp_path).splitlines()
    assert "| one-shot | dense: 85.00 / 86.00 | | | |" in lines
    assert "| one-shot, neurons | kfac (group OBS) | 85.00 / 85.50 (1) | – | – |" in lines
    assert "| one-shot, neurons | kfac, bias not free | 84.00 / 84.50 (1) | – | – |" in lines
    assert "| one-shot, heads | magnitude | – | – | 50.00 / 51.00 (1) |" in lines
    assert "| gradual neurons, from the task fine-tune | dense fine-tune: 85.20 / 85.80 (1) | | | |" in lines
    assert "| gradual neurons, from the task fine-tune | kfac (group OBS) | 87.00 / 86.00 (1) | – | – |" in lines
    assert "| gradual neurons, from the task fine-tune | kfac, bias not free | 85.50 / 85.50 (2) | – | – |" in lines
    assert "| gradual neurons, from the task fine-tune | Taylor | – | 84.00 / 83.00 (1) | – |" in lines
    setting = "gradual neurons + a quarter of the heads, from the pre-trained model"
    assert f"| {setting} | kfac, bias not free | 83.00 / 82.00 (1) | – | – |" in lines
    # no neurons-only file from the pre-trained model, nor one with half of the heads; scan rows and other starts out
    assert not any(
        "neurons, from the pre-trained" in line or "half" in line or "10.00" in line or "20.00" in line
        for line in lines
    )
    out = tmp_path / "structured.png"
    report_structured.plot(tmp_path, out)
    assert out.stat().st_size > 10_000

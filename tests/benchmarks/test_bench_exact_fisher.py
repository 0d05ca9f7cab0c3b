"""`python -m benchmarks.exact_fisher --quick`: every rule against exact greedy OBS on a small net (issue 17)."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_ranks_row_wise_obc_near_exact_obs(tmp_path):
    out = tmp_path / "exact.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.exact_fisher", "--quick", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "FLS_HF_DISABLE_PROGRESS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rise = {name: values["0.5"] for name, values in report["loss_rise"].items()}
    assert set(rise) >= {
        "exact greedy OBS (full M)",
        "magnitude",
        "kfac + row-wise OBC",
        "fls_hf package default (fishleg)",
    }
    assert all(math.isfinite(v) for v in rise.values())
    assert rise["kfac + row-wise OBC"] < rise["magnitude"] / 5
    assert rise["kfac + row-wise OBC"] < rise["fls_hf package default (fishleg)"]
    assert "| kfac + row-wise OBC |" in done.stdout

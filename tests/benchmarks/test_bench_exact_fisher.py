"""`python -m benchmarks.exact_fisher --quick`: every rule against exact greedy OBS on a small net (issue 17)."""

import math
from pathlib import Path

from helpers import run_quick_study

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_ranks_row_wise_obc_near_exact_obs(tmp_path):
    report, done = run_quick_study("exact_fisher", tmp_path / "exact.json", in_process=True)
    rise = {name: values["0.5"] for name, values in report["loss_rise"].items()}
    assert set(rise) >= {
        "exact greedy OBS (full M)",
        "magnitude",
        "kfac + row-wise OBC",
        "fishleg diagonal Q (the package default before issue 17)",
        "fishleg Kronecker Q, K-FAC start + row-wise OBC",
    }
    assert all(math.isfinite(v) for v in rise.values())
    assert rise["kfac + row-wise OBC"] < rise["magnitude"] / 5
    assert rise["kfac + row-wise OBC"] < rise["fishleg diagonal Q (the package default before issue 17)"]
    # FishLeg's Kronecker Q in the same rule is far ahead of its diagonal Q with the old rule
    assert rise["fishleg Kronecker Q, K-FAC start + row-wise OBC"] < rise["magnitude"] / 5
    assert "| kfac + row-wise OBC |" in done.stdout

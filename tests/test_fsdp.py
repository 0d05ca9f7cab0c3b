"""Issue 19: pruning under FSDP2 on two CPU processes (gloo, `fully_shard` over a 1-D mesh, the public API).

`tests/scripts/fsdp_prune.py` prunes a tiny BERT whose targeted weights are sharded by rows (odd sizes: unequal
blocks) and the same model unsharded in each process, from the same weights, batches and seeds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_prune.py"


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLS_HF_DISABLE_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    result = subprocess.run([*command, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "fsdp.json").read_text())


CASES = [
    "magnitude-global-70",
    "magnitude-per-layer-60",
    "magnitude-ties-55",
    "magnitude-2:4",
    "kfac-obc-60",
    "kfac-obc-sweep-2:4",
    "kfac-obc-gradual-80",
]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_sharded_pruning_reaches_the_target_with_the_unsharded_masks(fsdp_results, case):
    """Exact target, and the masks and weights of the unsharded run (global counts and ties over the ranks' rows,
    Ā all-reduced, G's rows and the sweep's mean G_ii taken over all shards)."""
    row = fsdp_results[case]
    assert row["zeros"] == row["target_zeros"] == row["plain_zeros"] == row["report_zeros"]
    assert row["mismatches"] == 0
    assert row["max_weight_difference"] == 0.0


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["kfac-neurons-uniform-50", "kfac-heads-global-50", "magnitude-neurons-heads-60"])
def test_sharded_structures_remove_the_unsharded_groups(fsdp_results, case):
    """Neurons / heads under FSDP2: the groups of the unsharded run (each cost summed over the ranks' rows), their
    producer rows masked on the rank that holds them, the compensation (weights and biases) the same up to rounding."""
    row = fsdp_results[case]
    assert row["sharded_removed"] == row["removed"] and sum(row["removed"]) > 0
    assert row["mismatches"] == 0
    assert row["max_weight_difference"] < 1e-6
    assert row["max_bias_difference"] < 1e-6
    assert (row["bias_moved"] > 0) == case.startswith("kfac")  # group OBS gives the removed mean to the bias
    assert "`curvature.first_order` is not supported under FSDP" in fsdp_results["first_order_refused"]


@pytest.mark.distributed
def test_sharded_structures_under_lora_hold_the_removed_groups_adapter_entries_at_zero(fsdp_results):
    """LoRA on every layer of BERT's blocks (B random), a gradual neurons + heads run sharded: the unsharded run's
    groups, base weights and LoRA factors exactly (lora_B's rows sharded as its producer's, each rank zeroing the rows
    it holds), the removed groups' factor entries zero and the others trained."""
    row = fsdp_results["lora-magnitude-neurons-heads"]
    assert row["sharded_removed"] == row["removed"] == [10, 10, 1, 1]
    assert row["factors"] == 12  # per layer: lora_A of both consumers, lora_B of intermediate, query, key, value
    assert row["max_removed_factor_entry"] == 0.0 and row["lora_factors_nonzero"]
    assert row["max_weight_difference"] == 0.0


@pytest.mark.distributed
def test_sharded_gradual_run_resumes_exactly_gathers_to_a_plain_model_and_refuses_what_it_cannot(fsdp_results):
    row = fsdp_results["kfac-obc-gradual-80"]
    assert row["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert row["reload_logit_difference"] < 1e-5  # save_pretrained of the gathered state → plain from_pretrained
    assert row["resume_same_masks"] and row["resume_max_weight_difference"] == 0.0  # killed at step 4, resumed
    assert "holds FSDP-sharded state (2 rank file(s)" in row["unsharded_load_refused"]
    # Ā (and its eigenbasis) sharded by layers: every layer's on one rank, each rank holding about half the bytes
    assert (
        sum(row["a_bar_layers"]) == row["plain_a_bar_layers"] and max(row["a_bar_layers"]) < row["plain_a_bar_layers"]
    )
    assert max(row["curvature_bytes"]) < 0.6 * row["plain_curvature_bytes"]
    assert "needs whole weights" in fsdp_results["refused"] and "magnitude or kfac" in fsdp_results["refused"]

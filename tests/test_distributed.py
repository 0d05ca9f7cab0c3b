"""Two CPU processes in data parallel (gloo): identical masks on every rank, exact final sparsity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_prune.py"


def launch(launcher: list[str], out: Path, methods: str, *extra: str) -> dict[str, list[dict]]:
    """method → what ranks 0 and 1 ended with, for each of the comma-separated `methods` (one launch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLS_HF_DISABLE_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*launcher, str(SCRIPT), str(out), methods, *extra], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {m: [json.loads((out / f"{m}.rank{r}.json").read_text()) for r in (0, 1)] for m in methods.split(",")}


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# accelerate's own launcher (what `accelerate launch` runs), as a user of Accelerate starts a script
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


@pytest.fixture(scope="module")
def fishleg_ranks(tmp_path_factory) -> list[dict]:
    """FishLeg under `accelerate launch`, saving every 4 steps, then resumed from step 4 (one launch for three tests:
    each launch costs two processes' imports; torchrun runs the other methods)."""
    return launch(ACCELERATE, tmp_path_factory.mktemp("ddp"), "fishleg", "resume")["fishleg"]


@pytest.fixture(scope="module")
def other_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """block_fisher and kfac-training under torchrun, one launch."""
    return launch(TORCHRUN, tmp_path_factory.mktemp("ddp"), "block_fisher,kfac-training")


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["fishleg", "block_fisher", "kfac-training"])
def test_two_rank_runs_have_identical_masks(method, request):
    """fishleg under `accelerate launch`, the others under torchrun. kfac-training: K-FAC statistics from each rank's
    training steps, averaged over the ranks (no pass after the first pruning step)."""
    ranks = (
        request.getfixturevalue("fishleg_ranks")
        if method == "fishleg"
        else request.getfixturevalue("other_ranks")[method]
    )
    assert all(r["world"] == 2 for r in ranks)
    if method == "kfac-training":
        assert ranks[0]["training_statistics"] == ranks[1]["training_statistics"] == [0.0, 1.0, 1.0, 1.0]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["zeros"] == round(0.8 * ranks[0]["numel"])
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)


@pytest.mark.distributed
def test_two_rank_resume_continues_each_ranks_draws(fishleg_ranks):
    """Ranks draw their own sampled labels and u (rank-seeded) and save their own RNG state beside the checkpoint;
    resuming from step 4 ends where the uninterrupted run did, on every rank."""
    ranks = fishleg_ranks
    assert ranks[0]["rng_files"] == ["curvature_rng_rank0.safetensors", "curvature_rng_rank1.safetensors"]
    assert ranks[0]["rng_hash"] != ranks[1]["rng_hash"]
    assert ranks[0]["digest"] == ranks[1]["digest"] == ranks[0]["resumed_digest"] == ranks[1]["resumed_digest"]
    for r in ranks:
        assert r["resumed_checksum"] == pytest.approx(r["checksum"], rel=1e-9)


@pytest.mark.distributed
def test_two_rank_accelerate_launch(fishleg_ranks):
    ranks = fishleg_ranks
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["curvature_steps"] == ranks[1]["curvature_steps"] > 0


def _digest_worker(rank: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    from fls_hf.distributed import check_same_on_all_ranks
    from fls_hf.errors import DistributedError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        check_same_on_all_ranks("same", "pruning masks")
        check_same_on_all_ranks(f"digest-of-rank-{rank}", "pruning masks")
        queue.put((rank, "no error"))
    except DistributedError as exc:
        queue.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_diverging_masks_fail_loudly_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_digest_worker, args=(r, str(tmp_path / "init"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all("pruning masks differ across ranks" in results[r] for r in (0, 1)), results


def test_fsdp_settings_the_trainer_runs_unsharded_are_said_once_and_pruning_goes_on(tmp_path, caplog):
    """On CPU accelerate runs FSDP settings as plain data parallelism (whole weights): one warning, then pruning."""
    from transformers import TrainingArguments

    from fls_hf import FishLegPruningCallback

    from helpers import tiny_bert

    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True, report_to=[])
    callback = FishLegPruningCallback({"pruning": {"method": "magnitude"}})
    with caplog.at_level("WARNING", logger="fls_hf"):
        callback.on_train_begin(args, _State(), None, model=tiny_bert(), train_dataloader=None)
    assert caplog.text.count("FSDP settings were given but the model is not sharded") == 1
    assert callback.pruner is not None


class _State:
    global_step = 0
    max_steps = 4


def test_fsdp_sharded_model_in_the_trainer_is_refused_naming_the_supported_path(tmp_path):
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, distribute_tensor
    from transformers import TrainingArguments

    from fls_hf import FishLegPruningCallback
    from fls_hf.errors import DistributedError

    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True, report_to=[])
    callback = FishLegPruningCallback({"pruning": {"method": "magnitude"}})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:  # one DTensor parameter on a one-process mesh, as accelerate's FSDP2 leaves the model's
        model = torch.nn.Linear(2, 2)
        model.weight = torch.nn.Parameter(distribute_tensor(torch.ones(2, 2), DeviceMesh("cpu", [0])))
        with pytest.raises(DistributedError, match="prune a `fully_shard`-ed model with `Pruner`"):
            callback.on_train_begin(args, _State(), None, model=model, train_dataloader=None)
    finally:
        dist.destroy_process_group()


def test_fsdp_in_the_trainer_when_opted_in_saves_the_pruner_state_per_rank(tmp_path, monkeypatch, caplog):
    """`FLS_HF_TRAINER_FSDP=1` (until verified on a GPU): the callback prunes the sharded model, `on_save` writes this
    rank's rows of the pruner state, `on_train_end` writes the report from the sums over the shards."""
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainingArguments

    from fls_hf import FishLegPruningCallback

    from helpers import MLP

    monkeypatch.setenv("FLS_HF_TRAINER_FSDP", "1")
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True, report_to=[])
    callback = FishLegPruningCallback({"pruning": {"method": "magnitude", "final_sparsity": 0.5, "ignore": []}})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = MLP(sizes=(6, 8, 4))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        state = _State()
        with caplog.at_level("WARNING", logger="fls_hf"):
            callback.on_train_begin(args, state, None, model=model, train_dataloader=None)
        assert "not yet verified on GPUs" in caplog.text and callback.pruner.shards is not None
        state.global_step = 4
        callback.on_step_end(args, state, None, model=model)  # the schedule's end: 50 %
        callback.on_save(args, state, None)
        saved = tmp_path / "checkpoint-4" / "fls_pruner"
        assert json.loads((saved / "fls_pruner.rank0.json").read_text())["shard"] == {"rank": 0, "world_size": 1}
        callback.on_train_end(args, state, None, model=model)
        report = json.loads((tmp_path / "sparsity_report.json").read_text())
        assert report["global_sparsity"] == pytest.approx(0.5, abs=0.02)
    finally:
        dist.destroy_process_group()

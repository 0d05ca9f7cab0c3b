"""Run by tests/test_distributed.py under torchrun / accelerate launch: 2 CPU ranks (gloo) prune a tiny BERT.

The second argument names one method or several (comma-separated, run one after the other in the same launch). For
each, every rank writes what it ended with (mask digest, sparsity, a weight checksum) to OUT/<method>.rank<r>.json.
With a third argument `resume`, each run also saves every 4 steps, and a second Trainer resumes from step 4 to the
same end: each rank adds what the resumed run ended with, the per-rank curvature RNG files of the checkpoint, and a
hash of its own generator state (ranks draw their own labels and u).
"""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fls_hf import FishLegPruningTrainer, sparsity_report  # noqa: E402

from helpers import tiny_bert  # noqa: E402
from test_trainer import dataset, training_args  # noqa: E402

out, methods = Path(sys.argv[1]), sys.argv[2].split(",")
resume = sys.argv[3:] == ["resume"]
torch.set_num_threads(1)
CURVATURE = {
    "fishleg": {"warmup_steps": 3, "refinement_steps": 2, "block_size": 8, "refine_every": 3, "init_examples": 16},
    "block_fisher": {"num_grads": 8, "block_size": 8},
    "kfac-training": {"num_examples": 4, "statistics": "training"},  # each rank's two steps before a pruning step
}
saving = {"save_strategy": "steps", "save_steps": 4} if resume else {}


def recipe(method: str) -> dict:
    return {
        "pruning": {
            "method": method.split("-")[0],
            "init_sparsity": 0.3,
            "final_sparsity": 0.8,
            "start_step": 0,
            "end_step": 6,
            "update_frequency": 2,
            "obs_block_size": 8,
        },
        "curvature": {"damping": 1e-3, "num_batches": 2, **CURVATURE[method]},
    }


def run(method: str, checkpoint=None):
    trainer = FishLegPruningTrainer(
        model=tiny_bert(),
        recipe=recipe(method),
        train_dataset=dataset(),
        args=training_args(out / method / "run", max_steps=8, per_device_train_batch_size=2, **saving),
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def checksum(model):
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def result_of(method: str) -> dict:
    trainer = run(method)
    report = sparsity_report(trainer.model, trainer.recipe)
    result = {
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "digest": trainer.pruner.masks.digest(),
        "zeros": report.zeros,
        "numel": report.numel,
        "checksum": checksum(trainer.model),
        "curvature_steps": getattr(trainer.pruner.provider, "steps_done", 0),
        "training_statistics": [h.get("training_statistics") for h in trainer.pruner.history],
    }
    if resume:
        state = trainer.pruner.provider.rng_state()
        result["rng_hash"] = hashlib.sha256(state.numpy().tobytes()).hexdigest()
        checkpoint = out / method / "run" / "checkpoint-4"
        result["rng_files"] = sorted(p.name for p in (checkpoint / "fls_pruner").glob("curvature_rng_*"))
        if dist.is_initialized():
            dist.barrier()  # every rank has read the checkpoint's listing before any rewrites it
        resumed = run(method, str(checkpoint))
        result["resumed_digest"] = resumed.pruner.masks.digest()
        result["resumed_checksum"] = checksum(resumed.model)
    return result


for method in methods:  # one launch for several methods: each launch costs two processes' imports
    result = result_of(method)
    rank = dist.get_rank() if dist.is_initialized() else -1  # the Trainer sets up the process group
    (out / f"{method}.rank{rank}.json").write_text(json.dumps(result))
if dist.is_initialized():  # left to interpreter teardown, gloo's threads can abort a finished run (SIGABRT)
    dist.destroy_process_group()

"""Issue 19's GPU row: `FishLegPruningTrainer` with FSDP2 settings (accelerate shards on GPUs only), BERT-base shape.

    torchrun --standalone --nproc_per_node 1 tests/scripts/trainer_fsdp.py OUT            # the GPU machine
    torchrun --standalone --nproc_per_node 1 tests/scripts/trainer_fsdp.py OUT --tiny     # CPU: the script's logic

Trains 12 optimizer steps pruning to 70 % (kfac, row-wise OBC) with a checkpoint at step 6, saves the model, reloads
it with plain transformers, then resumes a second run from the step-6 checkpoint. A third run removes half of the FFN
neurons (issue 20: kfac group OBS, uniform), saves (zeros under FSDP), and shrinks the reloaded model in one process
with `save_shrunk`. Writes OUT/trainer_fsdp.json: whether the weights were DTensors (sharded), exact target, the
reloaded logits' difference, whether the resumed run ends with the same masks, and the shrunk model's width and
logits' difference. Not a pytest test: the Trainer shards only on GPUs (`benchmarks/gpu_checks.sh` runs it).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("FLS_HF_TRAINER_FSDP", "1")  # the opt-in while this path is unverified on GPUs
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    TrainingArguments,  # noqa: E402
)

from fls_hf import FishLegPruningTrainer, load_recipe, save_shrunk, sparsity_report  # noqa: E402

OUT = Path(sys.argv[1])
TINY = "--tiny" in sys.argv
CUDA = torch.cuda.is_available()
RECIPE = {
    "pruning": {
        "method": "kfac",
        "init_sparsity": 0.3,
        "final_sparsity": 0.7,
        "start_step": 0,
        "end_step": 8,
        "update_frequency": 2,
    },
    "curvature": {"num_examples": 32, "num_batches": 2},
}
NEURONS = {  # under FSDP the full-G rows are refused: each rank holds only its rows of G
    "pruning": {
        "method": "kfac",
        "mask_type": "neurons",
        "global_sparsity": False,
        "init_sparsity": 0.25,
        "final_sparsity": 0.5,
        "start_step": 0,
        "end_step": 8,
        "update_frequency": 4,
    },
    "curvature": {"num_examples": 32, "num_batches": 2, "max_full_g_rows": 0},
}
SHAPE = (
    {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 64}
    if TINY
    else {}  # BERT-base
)


def data(n=256, seq_len=32 if TINY else 128, seed=0) -> list[dict]:
    """Token examples with a label learnable from the first token (a plain list: the GPU machine has no `datasets`)."""
    g = torch.Generator().manual_seed(seed)
    vocab = SHAPE.get("vocab_size", 30522)
    ids = torch.randint(1, vocab, (n, seq_len), generator=g)
    return [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": (row[0] > vocab // 2).long()}
        for row in ids
    ]


def arguments(output_dir):
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=8 if TINY else 16,
        max_steps=12,
        save_strategy="steps",
        save_steps=6,
        learning_rate=1e-4,
        bf16=CUDA,
        use_cpu=not CUDA,
        fsdp=True,
        fsdp_config={
            "version": 2,
            "transformer_layer_cls_to_wrap": ["BertLayer"],
            "state_dict_type": "FULL_STATE_DICT",
        },
        report_to=[],
        seed=0,
        disable_tqdm=True,
        logging_steps=4,
    )


def model():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**SHAPE, num_labels=2))


def live_logits(trainer, batch) -> torch.Tensor:
    """The trained (possibly sharded) model's float32 logits on `batch`, on the CPU."""
    device = next(trainer.model.parameters()).device
    trainer.model.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        return trainer.model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def zeros_of(path) -> dict:
    reloaded = AutoModelForSequenceClassification.from_pretrained(path)
    return {k: v == 0 for k, v in reloaded.state_dict().items() if k.endswith(".weight") and "encoder" in k}


BATCH = {k: torch.stack([e[k] for e in data(4, seed=1)]) for k in ("input_ids", "attention_mask")}
result = {"cuda": CUDA, "device": torch.cuda.get_device_name() if CUDA else "cpu", "tiny": TINY}
first = FishLegPruningTrainer(model=model(), args=arguments(OUT / "run"), recipe=RECIPE, train_dataset=data())
first.train()
result["sharded"] = any(isinstance(p, DTensor) for p in first.model.parameters())
first.save_model(str(OUT / "saved"))
if first.args.should_save:
    reloaded = AutoModelForSequenceClassification.from_pretrained(OUT / "saved").eval()
    report = sparsity_report(reloaded, load_recipe(RECIPE))
    result["zeros"], result["target_zeros"] = report.zeros, round(0.7 * report.numel)
    with torch.no_grad():
        result["reload_logit_difference"] = float((reloaded(**BATCH).logits - live_logits(first, BATCH)).abs().max())
# killed after step 6: a fresh trainer resumes from the checkpoint and must end with the same masks
second = FishLegPruningTrainer(model=model(), args=arguments(OUT / "run"), recipe=RECIPE, train_dataset=data())
second.train(resume_from_checkpoint=str(OUT / "run" / "checkpoint-6"))
second.save_model(str(OUT / "resumed"))
if second.args.should_save:
    a, b = zeros_of(OUT / "saved"), zeros_of(OUT / "resumed")
    result["resume_same_masks"] = all(torch.equal(a[k], b[k]) for k in a)
# FFN neurons: the sharded run saves zeros; one process shrinks the saved model, which plain transformers reloads
third = FishLegPruningTrainer(model=model(), args=arguments(OUT / "neurons"), recipe=NEURONS, train_dataset=data())
third.train()
third.save_model(str(OUT / "neurons-saved"))
live = live_logits(third, BATCH)
if third.args.should_save:
    saved = AutoModelForSequenceClassification.from_pretrained(OUT / "neurons-saved")
    save_shrunk(saved, OUT / "neurons-shrunk")
    shrunk = AutoModelForSequenceClassification.from_pretrained(OUT / "neurons-shrunk").eval()
    result["neurons_intermediate_size"] = [third.model.config.intermediate_size, shrunk.config.intermediate_size]
    with torch.no_grad():
        result["neurons_shrunk_logit_difference"] = float((shrunk(**BATCH).logits - live).abs().max())
    (OUT / "trainer_fsdp.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
if torch.distributed.is_initialized():  # left to interpreter teardown, gloo's threads can abort a finished run
    torch.distributed.destroy_process_group()

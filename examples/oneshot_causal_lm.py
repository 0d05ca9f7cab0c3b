"""One-shot FLS pruning of a small causal LM: perplexity before and after, 50 % unstructured, 2:4 and half of
the FFN neurons (a smaller model that plain transformers loads).

A GPT-2 built from a small config (its linears are transformers' Conv1D) is trained briefly on the
embedded movie-review snippets with a character-level vocabulary (no tokenizer download), then a copy
is pruned one-shot with `fls_hf.oneshot` for each pattern; perplexity is measured on held-out snippets.
The neurons copy is saved shrunk (`fls_hf.save_shrunk`: `n_inner` halved) and reloaded with plain
`GPT2LMHeadModel.from_pretrained`.

    python examples/oneshot_causal_lm.py                # ~3 minutes on 2 CPU cores (measured 3 min 9 s)
    python examples/oneshot_causal_lm.py --train_steps 50 --recipe_args curvature.damping=1e-3
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fls_hf import oneshot, save_shrunk
from fls_hf.data import load_movie_snippets
from fls_hf.recipe import parse_overrides

SEQ_LEN = 64


def char_batches(sentences: list[str], vocab: dict[str, int], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Fixed-length character sequences (padded with 0, labels -100 on padding), in batches."""
    rows = []
    for text in sentences:
        ids = [vocab.get(c, 1) for c in text[:SEQ_LEN]]
        rows.append(ids + [0] * (SEQ_LEN - len(ids)))
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": mask[i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, len(rows), batch_size)
    ]


@torch.no_grad()
def perplexity(model: GPT2LMHeadModel, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return math.exp(total / tokens)


def train(model: GPT2LMHeadModel, batches: list[dict[str, torch.Tensor]], steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_steps", type=int, default=1500)
    parser.add_argument("--recipe_args", nargs="*", default=[])
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_movie_snippets(seed=0)
    train_text, test_text = list(data["train"]["sentence"]), list(data["test"]["sentence"])[:512]
    chars = sorted({c for text in train_text for c in text})
    vocab = {c: i + 2 for i, c in enumerate(chars)}  # 0 = padding, 1 = unknown
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(vocab) + 2,
            n_positions=SEQ_LEN,
            n_embd=128,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    train_batches, test_batches = char_batches(train_text, vocab, 32), char_batches(test_text, vocab, 64)
    train(model, train_batches, args.train_steps)
    print(f"dense perplexity: {perplexity(model, test_batches):.3f}")
    for mask_type in ("unstructured", "2:4"):
        pruned = copy.deepcopy(model)
        # the package defaults: K-FAC statistics, row-wise OBC, relative damping 1e-2 (benchmarks/README.md)
        recipe = {
            "pruning": {
                "final_sparsity": 0.5,
                "mask_type": mask_type,
                "targets": [r"re:.*\.h\.\d+\..*(c_attn|c_proj|c_fc)$"],
            },
            "curvature": {"num_examples": 512, "num_batches": 16},
        }
        report = oneshot(pruned, train_batches[:16], recipe, overrides=parse_overrides(args.recipe_args))
        print(
            f"FLS one-shot {mask_type:12s} sparsity {100 * report.global_sparsity:.1f} %: perplexity "
            f"{perplexity(pruned, test_batches):.3f}"
        )
        magnitude = copy.deepcopy(model)
        oneshot(
            magnitude,
            train_batches[:16],
            {"pruning": {**recipe["pruning"], "method": "magnitude", "compensation": "none"}},
        )
        print(
            f"magnitude    {mask_type:12s} sparsity {100 * report.global_sparsity:.1f} %: perplexity "
            f"{perplexity(magnitude, test_batches):.3f}"
        )
    structured(model, train_batches[:16], test_batches, args.recipe_args)


def structured(model: GPT2LMHeadModel, calibration: list[dict], test_batches: list[dict], recipe_args: list[str]):
    """Half of every block's FFN neurons, by group OBS (the default kfac), first-order Taylor and group magnitude;
    the kfac copy saved shrunk and reloaded with plain transformers."""
    # every block loses the same share (global_sparsity: false), so one n_inner holds them all
    pruning = {"final_sparsity": 0.5, "mask_type": "neurons", "global_sparsity": False}
    for method in ("kfac", "taylor", "magnitude"):
        pruned = copy.deepcopy(model)
        curvature = {"kfac": {"num_examples": 512, "num_batches": 16}, "taylor": {"num_batches": 16}}.get(method, {})
        recipe = {"pruning": {**pruning, "method": method}, "curvature": curvature}
        overrides = parse_overrides(recipe_args) if method == "kfac" else None
        report = oneshot(pruned, calibration, recipe, overrides=overrides)
        name = {"kfac": "FLS one-shot", "taylor": "Taylor", "magnitude": "magnitude"}[method]
        print(
            f"{name:12s} {'neurons':12s} sparsity {100 * report.global_sparsity:.1f} %: perplexity "
            f"{perplexity(pruned, test_batches):.3f}"
        )
        if method == "kfac":
            with tempfile.TemporaryDirectory() as folder:
                save_shrunk(pruned, folder)
                small = GPT2LMHeadModel.from_pretrained(folder)  # plain transformers, no fls_hf
                print(
                    f"  saved shrunk: n_inner {4 * model.config.n_embd} → {small.config.n_inner}, "
                    f"{count(model) / 1e6:.2f} M → {count(small) / 1e6:.2f} M parameters; reloaded with plain "
                    f"transformers: perplexity {perplexity(small, test_batches):.3f}"
                )


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()

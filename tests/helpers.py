"""Tiny real models and data for tests (built from configs; no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_bert(num_labels: int = 2, seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    config = BertConfig(**{**settings, **overrides})
    return BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Llama family: gate / up / down MLP, grouped-query attention (4 heads over 2 KV heads)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_decoder_settings(overrides)))


def tiny_decoder(family: str, seed: int = 0, **overrides):
    """`tiny_llama`'s sizes in another decoder family of transformers (`family`: Qwen3, Phi3, ... as in its class
    names), special tokens inside the vocabulary; an override of None leaves that setting out."""
    import transformers

    torch.manual_seed(seed)
    settings = _decoder_settings({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides})
    config = getattr(transformers, f"{family}Config")(**settings)
    return getattr(transformers, f"{family}ForCausalLM")(config)


def _decoder_settings(overrides: dict) -> dict:
    settings = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=32,
    )
    return {k: v for k, v in {**settings, **overrides}.items() if v is not None}


def causal_batches(**kwargs) -> list[dict]:
    """`token_batches` with next-token labels (padding ignored)."""
    return [
        {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in token_batches(**kwargs)
    ]


def token_batches(
    n_batches: int = 4, batch_size: int = 4, seq_len: int = 8, vocab: int = 64, num_labels: int = 2, seed: int = 0
):
    """Random token batches with padding at the end of some rows, and labels."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        mask[0, seq_len // 2 :] = 0
        ids[mask == 0] = 0
        labels = torch.randint(0, num_labels, (batch_size,), generator=g)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


class MLP(nn.Sequential):
    def __init__(self, sizes=(6, 5, 3), bias: bool = True, seed: int = 0):
        torch.manual_seed(seed)
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        super().__init__(*layers)


def mlp_problem(n_batches: int = 3):
    """MLP (6, 5, 3) with biases, `n_batches` batches of 4 labelled inputs, and its two layers' adapters."""
    from fls_hf.model import adapter_for

    model = MLP((6, 5, 3))
    g = torch.Generator().manual_seed(1)
    batches = [
        {"input": torch.randn(4, 6, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
        for _ in range(n_batches)
    ]
    return model, batches, {n: adapter_for(n, model[int(n)]) for n in ("0", "2")}


def wide_row_problem(rows: int = 12, cols: int = 512, sparsity: float = 0.5, seed: int = 11):
    """A layer wide enough that conjugate gradients undercut the factorisations at 50 %: Ā with a fat, decaying
    spectrum (eigenvalues over four decades, as real activations give), G_ii over a decade, relative damping."""
    from fls_hf.curvature import RowModel

    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(1, -3, cols, dtype=torch.float64)
    row_weight = torch.logspace(-0.5, 0.5, rows, dtype=torch.float64)
    gamma = 1e-2 * float(row_weight.mean() * eigenvalues.mean())
    model = RowModel(basis, eigenvalues, row_weight, gamma)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    keep = torch.rand(rows, cols, generator=g) >= sparsity
    return w, keep, model


def row_losses(delta: torch.Tensor, model) -> torch.Tensor:
    """½ δ_iᵀ (G_ii Ā + γI) δ_i for each row i of δ: (rows,)."""
    quadratic = ((delta @ model.a_bar()) * delta).sum(dim=1) * model.row_weight + model.damping * delta.square().sum(1)
    return 0.5 * quadratic


def row_loss(delta: torch.Tensor, model) -> float:
    """½ Σ_i δ_iᵀ (G_ii Ā + γI) δ_i."""
    return float(row_losses(delta, model).sum())


def run_quick_study(study: str, out, timeout: int = 600, *extra: str, in_process: bool = False):
    """`python -m benchmarks.<study> --quick --output out [extra]` from the repository root, progress bars off.

    `in_process`: run it in this process instead (for studies that start no process of their own): a new Python with
    torch and transformers costs 6–10 s per test on a slow host. Torch's threads, the working directory and the global
    random states are put back afterwards, so later tests run as before.

    Returns (the JSON report, the finished process or its stand-in with returncode / stdout / stderr); a non-zero
    exit fails with the tails of its output."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    command = [f"benchmarks.{study}", "--quick", "--output", str(out), *extra]
    if in_process:
        done = run_in_process(command, repo)
    else:
        env = {**os.environ, "FLS_HF_DISABLE_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, "-m", *command], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(Path(out).read_text()), done


def run_in_process(command: list[str], cwd):
    """`python -m command…` in this process (runpy): stdout / stderr captured, torch's threads, the working directory,
    FLS_HF_DISABLE_PROGRESS (set to 1 meanwhile) and the global random states put back. Returns a stand-in for the
    finished process (returncode, stdout, stderr)."""
    import contextlib
    import io
    import random
    import runpy
    import sys
    import types

    import numpy as np

    saved = (sys.argv, os.getcwd(), torch.get_num_threads(), os.environ.get("FLS_HF_DISABLE_PROGRESS"))
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    sys.argv = list(command)
    os.chdir(cwd)
    os.environ["FLS_HF_DISABLE_PROGRESS"] = "1"
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_module(command[0], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        torch.set_num_threads(saved[2])
        if saved[3] is None:
            os.environ.pop("FLS_HF_DISABLE_PROGRESS", None)
        else:
            os.environ["FLS_HF_DISABLE_PROGRESS"] = saved[3]
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
    return types.SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def merge_shrink_reload(model, pruner, batch: dict, directory, loader):
    """A PEFT model's masked merge gives its logits on `batch`, shrinks into `directory` and reloads with `loader` (a
    transformers Auto class) to the same logits: (save_shrunk's sizes, the reloaded model)."""
    from fls_hf import save_shrunk
    from fls_hf.peft import masked_merge_and_unload

    model.eval()
    with torch.no_grad():
        peft_logits = model(**batch).logits
        merged = masked_merge_and_unload(model, pruner)
        torch.testing.assert_close(merged(**batch).logits, peft_logits, rtol=0, atol=1e-5)  # nothing lost at merge
        sizes = save_shrunk(merged, str(directory))
        reloaded = loader.from_pretrained(directory).eval()
        torch.testing.assert_close(reloaded(**batch).logits, peft_logits, rtol=0, atol=1e-5)
    return sizes, reloaded


def zero_removed_inputs(pruned, original, blocks) -> list[int]:
    """In `original` (a copy of the model before pruning), zero the consumer columns of the groups `pruned` removed
    from each block: without compensation that alone gives the pruned model. The removed counts, per block."""
    from fls_hf.model.structures import live_groups

    counts = []
    with torch.no_grad():
        for block in blocks:
            gone = torch.nonzero(~live_groups(pruned, block)).flatten()
            original.get_submodule(block.consumer).weight[:, block.consumer_columns(gone)] = 0
            counts.append(len(gone))
    return counts

"""Issue 17, peers on a causal LM: fls_hf's K-FAC + row-wise OBC against llm-compressor's SparseGPT / Wanda.

One-shot pruning of a small character-level causal LM trained on the embedded movie-review snippets (the task of
examples/oneshot_causal_lm.py), to 50 % unstructured and to 2:4, scored by perplexity without fine-tuning:

- fls_hf `pruning.method: kfac`, `pruning.compensation: obc` with `pruning.obc_rounds` 1 and 4, `curvature.damping`
  scanned over 1e-9 … 1e-3 (1e-3: the package default) and chosen on the validation split (the test perplexity
  reported beside it); `magnitude` as the floor. fls_hf's defaults otherwise: one global threshold over the
  targeted layers (each at most 99 %), K-FAC statistics from 256 sequences with labels sampled from the model.
  One more scan prunes 50 % in every layer (`global_sparsity: false`, llm-compressor's allocation), unstructured.
- llm-compressor's `SparseGPTModifier` and `WandaPruningModifier` with their default hyper-parameters (sparsity 0.5,
  `mask_structure` "2:4" for 2:4), run from their own code in their own environment by
  benchmarks/peers/llmcompressor_causal_lm.py, on the same saved checkpoint and the same calibration sequences.

The model differs from the example's: the example's GPT-2 keeps its linears as transformers' `Conv1D`, which
llm-compressor 0.14 does not prune (its prunable types are torch's Linear / Conv1d / Conv2d / Conv3d by class
name, so a GPT-2 run ends with every weight intact and no error). Here the model is a `LlamaForCausalLM` built
from a config of the same size and vocabulary (hidden 128, 2 layers, 4 heads, intermediate 344; 0.42 M
parameters, lm_head untied as in Llama's default config), trained as the example trains (AdamW, lr 3e-3, batches
of 32 sequences of at most 64 characters, one batch per step in order, 1,500 steps). Pruned: the 14 projections
q/k/v/o/gate/up/down_proj of the 2 decoder layers (`TARGETS`), never the embeddings or lm_head. The dense model is
trained once and kept under benchmarks/cache/ (save_pretrained, with a character tokenizer that llm-compressor
needs as its processor), so both interpreters load the same weights.

Splits (seeded, disjoint): `load_movie_snippets(seed=0)` gives train / test (80 / 20 %, the example's split);
10 % of its train split (`Dataset.train_test_split(test_size=0.1, seed=0)`) is the validation split, the rest
the train split. The character vocabulary comes from the train split (0 = padding, 1 = unknown). Training and
calibration use the train split only: calibration = the first `--calibration` (256) sequences of a seed-0
permutation of it, the same sequences for every method (fls_hf: padded batches of 32, statistics over real
characters only; llm-compressor: one unpadded sequence per batch). Validation (846 snippets) picks the damping;
test (2,114 snippets) is reported. Perplexity = exp(mean next-character loss over real characters).

    python -m benchmarks.causal_lm            # train (cached) + every method + peers: ~8 min on one thread
    python -m benchmarks.causal_lm --quick    # smoke run: 30 training steps, 64-snippet eval, one damping
    python -m benchmarks.causal_lm --peers none --dampings 1e-5,1e-4 --obc_rounds 1
    python -m benchmarks.causal_lm --peers none --damping_mode relative --dampings 1e-4,1e-3,1e-2,1e-1

`--peers` runs the peers module after the fls_hf rows, with the peers' interpreter (default
benchmarks/.venv-peers/bin/python, made as benchmarks/peers/llmcompressor_oneshot.py says); when that interpreter
is missing (CI) the peers are skipped with a note. One torch thread (`--threads 1`; OMP_NUM_THREADS=1 for the
peers). Output: benchmarks/results/causal_lm.json (settings, dense perplexities, one row per method / pattern /
damping with validation and test perplexity, measured sparsity and the seconds of the whole pruning call, i.e.
calibration + pruning, for both sides) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fls_hf import oneshot
from fls_hf.data import load_movie_snippets

from .common.paths import BENCHMARKS, CACHE, REPO, RESULTS
from .common.rows import finish_report

SEQ_LEN = 64
BATCH_SIZE = 32
TARGETS = [r"re:.*layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$"]
DENSE_DIR = CACHE / "charlm-llama-dense"
QUICK_DENSE_DIR = CACHE / "charlm-llama-dense-quick"  # 30 training steps: for smoke runs only
PEERS_MODULE = "benchmarks.peers.llmcompressor_causal_lm"
PEERS_PYTHON = BENCHMARKS / ".venv-peers" / "bin" / "python"
PATTERNS = ("unstructured", "2:4")
SPARSITY = 0.5
QUICK = {"train_steps": 30, "calibration": 32, "eval_limit": 64, "dampings": "1e-4", "obc_rounds": "1"}


# ----------------------------------------------------------------------------- data
def splits(seed: int = 0) -> dict[str, list[str]]:
    """train / validation / test snippets (str), disjoint: the example's split, validation = 10 % of its train."""
    data = load_movie_snippets(seed=seed)
    held = data["train"].train_test_split(test_size=0.1, seed=seed)
    return {
        "train": list(held["train"]["sentence"]),
        "validation": list(held["test"]["sentence"]),
        "test": list(data["test"]["sentence"]),
    }


def vocabulary(texts: list[str]) -> dict[str, int]:
    """Character → id, 0 = padding, 1 = unknown (the example's vocabulary)."""
    return {c: i + 2 for i, c in enumerate(sorted({c for text in texts for c in text}))}


def encode(texts: list[str], vocab: dict[str, int]) -> list[list[int]]:
    """Each snippet's first SEQ_LEN characters as ids (unpadded)."""
    return [[vocab.get(c, 1) for c in text[:SEQ_LEN]] for text in texts]


def batches(sequences: list[list[int]], batch_size: int = BATCH_SIZE) -> list[dict[str, torch.Tensor]]:
    """Padded batches: input_ids, attention_mask (0 on padding) and labels (-100 on padding), each (n, SEQ_LEN)."""
    ids = torch.tensor([s + [0] * (SEQ_LEN - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (SEQ_LEN - len(s)) for s in sequences])
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": mask[i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, len(sequences), batch_size)
    ]


def calibration_order(n_train: int, count: int) -> list[int]:
    """Indices of the calibration sequences in the train split: the first `count` of a seed-0 permutation."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[:count].tolist()


def evaluation(texts: dict[str, list[str]], vocab: dict[str, int], limit: int | None) -> dict[str, list[dict]]:
    """Validation and test batches of 64 (the first `limit` snippets of each split, all when None)."""
    return {name: batches(encode(texts[name][:limit], vocab), 64) for name in ("validation", "test")}


@torch.no_grad()
def perplexity(model: torch.nn.Module, eval_batches: list[dict[str, torch.Tensor]]) -> float:
    """exp(mean next-character loss over real characters); each batch's mean loss weighted by its label count."""
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return math.exp(total / count)


def targeted(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The pruned projections, by the same regex fls_hf and llm-compressor are given."""
    pattern = re.compile(TARGETS[0].removeprefix("re:"))
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)}


def measured_sparsity(model: torch.nn.Module) -> dict[str, float | list[float]]:
    """Fraction of exact zeros over the targeted weights, and its range over the layers (the same count for all)."""
    weights = [m.weight.detach() for m in targeted(model).values()]
    per_layer = [float((w == 0).float().mean()) for w in weights]
    total = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {"sparsity": total, "layer_sparsity_range": [min(per_layer), max(per_layer)]}


# ----------------------------------------------------------------------------- dense model
def char_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with the ids of `encode` (llm-compressor wants a processor).

    `(?m).`: any one character, newlines included (Oniguruma syntax)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    table = {"<pad>": 0, "<unk>": 1, **vocab}
    backend = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=344,
        max_position_embeddings=SEQ_LEN,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def train(model: torch.nn.Module, train_batches: list[dict[str, torch.Tensor]], steps: int) -> None:
    """The example's training: AdamW (lr 3e-3), one batch per step, in order."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**train_batches[step % len(train_batches)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def dense_model(texts: dict[str, list[str]], steps: int, directory: Path) -> tuple[LlamaForCausalLM, dict]:
    """The cached dense model when trained with these settings, else trained now and saved (save_pretrained)."""
    vocab = vocabulary(texts["train"])
    settings = {"train_steps": steps, "batch_size": BATCH_SIZE, "lr": 3e-3, "seq_len": SEQ_LEN, "seed": 0}
    meta_file = directory / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta["settings"] == settings and meta["vocab"] == vocab:
            return LlamaForCausalLM.from_pretrained(directory).eval(), meta
    torch.manual_seed(0)
    model = tiny_llama(len(vocab) + 2)
    start = time.time()
    train(model, batches(encode(texts["train"], vocab)), steps)
    meta = {"settings": settings, "train_seconds": time.time() - start, "vocab": vocab}
    model.save_pretrained(directory)
    char_tokenizer(vocab).save_pretrained(directory)
    meta_file.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return model.eval(), meta


# ----------------------------------------------------------------------------- fls_hf rows
def recipe(
    method: str, mask_type: str, calibration: int, damping: float | None = None, mode: str = "absolute", **pruning
) -> dict:
    """A one-shot recipe for the projections: `magnitude`, or `kfac` with row-wise OBC (`pruning` keys added);
    `mode`: `curvature.damping_mode`."""
    base = {"method": method, "final_sparsity": SPARSITY, "mask_type": mask_type, "targets": TARGETS}
    if method == "magnitude":
        return {"pruning": {**base, "compensation": "none", **pruning}, "curvature": {}}
    num_batches = math.ceil(calibration / BATCH_SIZE)
    return {
        "pruning": {**base, "compensation": "obc", **pruning},
        "curvature": {
            "damping": damping,
            "damping_mode": mode,
            "num_examples": calibration,
            "num_batches": num_batches,
        },
    }


def kfac_groups(rounds: list[int]) -> list[tuple[str, str, dict]]:
    """(row label, pattern, pruning keys) of each damping scan: every pattern × `obc_rounds`, then one round with
    50 % in every layer (`global_sparsity: false`, llm-compressor's per-layer allocation; unstructured only)."""
    groups = [(f"fls kfac+obc, {r} round{'s' * (r > 1)}", p, {"obc_rounds": r}) for p in PATTERNS for r in rounds]
    per_layer = {"obc_rounds": 1, "global_sparsity": False}
    return groups + [("fls kfac+obc, 1 round, 50 % per layer", "unstructured", per_layer)]


def fls_row(dense, cfg: dict, calib: list[dict], evals: dict[str, list[dict]]) -> dict:
    """Prune a copy of `dense` with `oneshot(cfg)` on `calib`; perplexities, measured sparsity, seconds."""
    model = copy.deepcopy(dense)
    start = time.time()
    oneshot(model, calib, cfg)
    seconds = time.time() - start
    return {
        "validation": perplexity(model, evals["validation"]),
        "test": perplexity(model, evals["test"]),
        "seconds": seconds,
        **measured_sparsity(model),
    }


def fls_rows(
    dense, calib, evals, dampings: list[float], rounds: list[int], calibration: int, mode: str = "absolute"
) -> list[dict]:
    """magnitude for each pattern, then every damping of each kfac + OBC group; the damping with the lowest
    validation perplexity of each group is marked `chosen`."""
    rows = []
    for pattern in PATTERNS:
        cfg = recipe("magnitude", pattern, calibration)
        row = {"method": "magnitude", "source": "fls_hf", "pattern": pattern, "chosen": True, "recipe": cfg}
        rows.append({**row, **fls_row(dense, cfg, calib, evals)})
        report_line(rows[-1])
    for label, pattern, pruning in kfac_groups(rounds):
        scan = []
        for damping in dampings:
            cfg = recipe("kfac", pattern, calibration, damping, mode, **pruning)
            row = {"method": label, "source": "fls_hf", "pattern": pattern, "damping": damping, "recipe": cfg}
            row["damping_mode"] = mode
            scan.append({**row, **fls_row(dense, cfg, calib, evals)})
            report_line(scan[-1])
        best = min(scan, key=lambda row: row["validation"])
        rows.extend({**row, "chosen": row is best} for row in scan)
    return rows


def report_line(row: dict) -> None:
    lo, hi = row["layer_sparsity_range"]
    damping = f"  γ {row['damping']:.0e}" if "damping" in row else ""
    print(
        f"{row['method']:38s} {row['pattern']:12s}{damping}  val {row['validation']:.4f}  test {row['test']:.4f}  "
        f"zeros {100 * row['sparsity']:.2f} % (layers {100 * lo:.1f}…{100 * hi:.1f})  {row['seconds']:.1f} s",
        flush=True,
    )


# ----------------------------------------------------------------------------- peers
def peer_rows(python: Path, dense_dir: Path, args) -> dict:
    """llm-compressor's rows (and its interpreter's dense perplexities), run from its own environment."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        command = [str(python.absolute()), "-m", PEERS_MODULE, "--dense_dir", str(dense_dir), "--output", str(out)]
        command += ["--calibration", str(args.calibration), "--threads", str(args.threads)]
        command += ["--eval_limit", str(args.eval_limit)] if args.eval_limit else []
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(command, check=True, cwd=REPO, env=env)
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------- table
def markdown(report: dict) -> str:
    """One line per method: validation / test perplexity at 50 % and 2:4, fls_hf's damping chosen on validation."""
    dense = report["dense"]
    lines = [
        "| method | 50 % val | 50 % test | 2:4 val | 2:4 test | γ chosen (50 % / 2:4) |",
        "|---|---|---|---|---|---|",
        f"| dense | {dense['validation']:.3f} | {dense['test']:.3f} | {dense['validation']:.3f} | "
        f"{dense['test']:.3f} | |",
    ]
    for method in dict.fromkeys(row["method"] for row in report["rows"]):
        chosen = {r["pattern"]: r for r in report["rows"] if r["method"] == method and r.get("chosen", True)}
        cells = [f"{chosen[p][s]:.3f}" if p in chosen else "–" for p in PATTERNS for s in ("validation", "test")]
        gammas = " / ".join(f"{chosen[p]['damping']:.0e}" for p in PATTERNS if "damping" in chosen.get(p, {}))
        lines.append(f"| {method} | {' | '.join(cells)} | {gammas} |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_steps", type=int, default=1500)
    parser.add_argument("--calibration", type=int, default=256, help="calibration sequences, the same for everyone")
    parser.add_argument(
        "--dampings", default="1e-9,1e-8,1e-7,1e-6,1e-5,1e-4,1e-3", help="curvature.damping values to scan"
    )
    parser.add_argument(
        "--damping_mode",
        default="absolute",
        choices=("absolute", "relative"),
        help="curvature.damping_mode of the scan (relative: multiples of the mean K-FAC Fisher diagonal)",
    )
    parser.add_argument("--obc_rounds", default="1,4")
    parser.add_argument("--eval_limit", type=int, default=None, help="first N snippets of validation and test")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
    )
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--peers",
        default=str(PEERS_PYTHON),
        metavar="PYTHON",
        help=f"llm-compressor's interpreter (default {PEERS_PYTHON}); `none` skips the peers",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    texts = splits()
    dense_dir = QUICK_DENSE_DIR if args.quick else DENSE_DIR
    dense, meta = dense_model(texts, args.train_steps, dense_dir)
    vocab = meta["vocab"]
    train_sequences = encode(texts["train"], vocab)
    calib = batches([train_sequences[i] for i in calibration_order(len(train_sequences), args.calibration)])
    evals = evaluation(texts, vocab, args.eval_limit)
    report = {
        "settings": {
            "model": "LlamaForCausalLM, hidden 128, 2 layers, 4 heads, intermediate 344, character vocabulary",
            "vocab_size": len(vocab) + 2,
            "targets": TARGETS,
            "sparsity": SPARSITY,
            "calibration_sequences": args.calibration,
            "validation_snippets": sum(len(b["input_ids"]) for b in evals["validation"]),
            "test_snippets": sum(len(b["input_ids"]) for b in evals["test"]),
            "threads": args.threads,
            **meta["settings"],
        },
        "dense": {
            "validation": perplexity(dense, evals["validation"]),
            "test": perplexity(dense, evals["test"]),
            "train_seconds": meta["train_seconds"],
            "checkpoint": str(dense_dir.relative_to(REPO)),
        },
        "rows": [],
    }
    print(f"dense: val {report['dense']['validation']:.4f}  test {report['dense']['test']:.4f}", flush=True)
    out = Path(args.output) if args.output else RESULTS / ("causal_lm_quick.json" if args.quick else "causal_lm.json")
    dampings = [float(d) for d in args.dampings.split(",")]
    rounds = [int(r) for r in args.obc_rounds.split(",")]
    report["rows"] = fls_rows(dense, calib, evals, dampings, rounds, args.calibration, args.damping_mode)
    out.write_text(json.dumps(report, indent=1) + "\n")
    python = Path(args.peers)
    if args.peers == "none":
        print("peers: skipped (--peers none)")
    elif not python.is_file():
        print(
            f"peers: skipped, no interpreter at {python} (benchmarks/peers/llmcompressor_oneshot.py: how to make one)"
        )
    else:
        peers = peer_rows(python, dense_dir, args)
        report["peers_dense"] = peers["dense"]
        report["rows"].extend(peers["rows"])
    finish_report(report, out, markdown(report))


if __name__ == "__main__":
    main()

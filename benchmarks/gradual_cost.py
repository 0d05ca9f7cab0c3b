"""Issue 18, cost of gradual pruning in the Trainer: wall / CPU time and peak memory against a plain fine-tune.

A random-init BERT-family sequence classifier of a chosen shape (built from a config: no Hub access) is fine-tuned
on synthetic 2-class token sequences (random ids and labels: timing only, accuracy means nothing here) by the stock
`transformers.Trainer` (`fine-tune`, the reference) and by `FishLegPruningTrainer` with each recipe in `--runs`,
every run in a fresh subprocess (its peak is its own). The schedule is issue 18's: `--steps` optimizer steps,
30 → 90 % over the first half, a pruning step every `--steps / 12` steps (recipes keep their method, compensation
and curvature settings; `pruning.start_step`, `end_step`, `update_frequency`, `init_sparsity`, `final_sparsity`
are set). Runs (`--runs`, comma-separated):

- `fine-tune`: `transformers.Trainer`, no pruning;
- `magnitude`: GMP (`pruning.method: magnitude`, no compensation);
- `shipped-90`: `recipes/gradual-unstructured-90.yaml` (kfac + row-wise OBC, relative damping);
- `shipped-90-exact` / `-joint` / `-sweep`: the same with that `pruning.obc_solver`;
- `shipped-90-pass` / `-training`: the same with that `curvature.statistics`;
- `shipped-90-64`: the same with 64 K-FAC examples per pruning step instead of 256.

Measured per run: wall and CPU seconds of `trainer.train()` (`time.process_time`, all threads), × the fine-tune's,
peak memory during `train()` (CUDA: `max_memory_allocated`, reset first; CPU: peak RSS via `/proc/self/clear_refs`
where writable, else ru_maxrss), the final sparsity of the targeted weights.

    python -m benchmarks.gradual_cost --quick                                   # CI smoke run, seconds
    python -m benchmarks.gradual_cost --shape minilm --steps 60                 # CPU, MiniLM shape
    python -m benchmarks.gradual_cost --shape bert-base --device cuda --bf16    # GPU: issue 18's BERT-base row

Shapes: `quick` (hidden 64, 2 layers, vocabulary 512; batch 8 × 32), `minilm` (384, 6 layers, 1,536, 12 heads),
`bert-base` (768, 12 layers, 3,072, 12 heads); vocabulary 30,522 and batch 32 × 128 for the last two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from .common import children
from .common.paths import REPO, RESULTS
from .common.rows import finish_report

SHAPES = {
    "quick": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4},
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536, "num_attention_heads": 12},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072, "num_attention_heads": 12},
}
VARIANTS = {  # shipped-90-<variant>: one setting of the shipped recipe changed
    "exact": ("pruning", "obc_solver", "exact"),
    "joint": ("pruning", "obc_solver", "joint"),
    "sweep": ("pruning", "obc_solver", "sweep"),
    "pass": ("curvature", "statistics", "pass"),
    "training": ("curvature", "statistics", "training"),
    "64": ("curvature", "num_examples", 64),
}
RUNS = ("fine-tune", "magnitude", "shipped-90", *(f"shipped-90-{v}" for v in VARIANTS))
SHIPPED = REPO / "recipes" / "gradual-unstructured-90.yaml"


def recipe_for(run: str, steps: int) -> dict | None:
    """The run's recipe with issue 18's schedule scaled to `steps`; None for the plain fine-tune."""
    if run == "fine-tune":
        return None
    from fls_hf import load_recipe

    recipe = load_recipe(SHIPPED).to_dict()
    if run == "magnitude":
        recipe["pruning"].update(method="magnitude", compensation="none")
        recipe["curvature"] = {}
    elif run.removeprefix("shipped-90-") in VARIANTS:
        section, key, value = VARIANTS[run.removeprefix("shipped-90-")]
        recipe[section][key] = value
    elif run != "shipped-90":
        raise SystemExit(f"unknown run {run!r}; choose from {', '.join(RUNS)}")
    every = max(1, steps // 12)
    recipe["pruning"].update(
        init_sparsity=0.3, final_sparsity=0.9, start_step=0, end_step=max(every, steps // 2), update_frequency=every
    )
    return recipe


def child(args) -> dict:
    """One run in this process: build the model and data, train, measure."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from fls_hf import FishLegPruningTrainer, sparsity_report

    from .scale import Meter

    torch.manual_seed(0)
    quick = args.shape == "quick"
    vocab, batch, seq_len = (512, 8, 32) if quick else (30522, 32, 128)
    config = BertConfig(vocab_size=vocab, num_labels=2, max_position_embeddings=max(512, seq_len), **SHAPES[args.shape])
    model = BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(1)
    n = batch * args.steps
    ids = torch.randint(1, vocab, (n, seq_len), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    data = [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=args.steps,
            learning_rate=5e-5,
            logging_steps=max(1, args.steps // 4),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=args.device == "cpu",
            bf16=args.bf16,
            dataloader_num_workers=0,
        )
        recipe = recipe_for(args.run, args.steps)
        if recipe is None:
            trainer = Trainer(model=model, args=training, train_dataset=data)
        else:
            trainer = FishLegPruningTrainer(model=model, args=training, train_dataset=data, recipe=recipe)
        meter = Meter(torch.device(args.device))
        meter.start()
        trainer.train()
        measured = meter.stop()  # synchronises on CUDA
    row = {
        "run": args.run,
        "recipe": recipe,
        **{k: measured[k] for k in ("wall_seconds", "cpu_seconds", "peak_growth_bytes", "memory_probe")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch": torch.__version__,
    }
    if recipe is not None:
        row["sparsity"] = sparsity_report(trainer.model, trainer.recipe).global_sparsity
    return row


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = next((r for r in rows if r["run"] == "fine-tune" and "error" not in r), None)
    lines = [
        f"{report['settings']['shape']} on {report['settings']['device']}, {report['settings']['steps']} steps",
        "",
        "| run | wall s | × fine-tune (wall) | CPU s | × fine-tune (CPU) | peak growth GiB | sparsity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['error']} | | | | | |")
            continue
        ratio = (lambda k: f"{r[k] / base[k]:.2f}×") if base else (lambda k: "–")
        sparsity = f"{100 * r['sparsity']:.2f} %" if "sparsity" in r else "–"
        lines.append(
            f"| {r['run']} | {r['wall_seconds']:.1f} | {ratio('wall_seconds')} | {r['cpu_seconds']:.1f} | "
            f"{ratio('cpu_seconds')} | {r['peak_growth_bytes'] / 2**30:.2f} | {sparsity} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="minilm", choices=tuple(SHAPES))
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each child (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="quick shape, 12 steps, fine-tune + shipped-90")
    parser.add_argument("--output", default=None)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--child_output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # a child
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        Path(args.child_output).write_text(json.dumps(child(args), indent=1) + "\n")
        return
    if args.quick:
        args.shape, args.steps, args.runs, args.threads = "quick", 12, "fine-tune,shipped-90", 1
    out = Path(args.output) if args.output else RESULTS / f"gradual_cost_{args.shape}_{args.device}.json"
    settings = {k: getattr(args, k) for k in ("shape", "steps", "device", "bf16", "threads")}
    report = {
        "settings": {**settings, "config": SHAPES[args.shape], "date": time.strftime("%Y-%m-%d %H:%M")},
        "rows": [],
    }
    for run in args.runs.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as row_file:
            command = [sys.executable, "-m", "benchmarks.gradual_cost", "--run", run, "--child_output", row_file.name]
            command += ["--shape", args.shape, "--steps", str(args.steps), "--device", args.device]
            command += (["--bf16"] if args.bf16 else []) + (["--threads", str(args.threads)] if args.threads else [])
            done = children.run_child(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            row = json.loads(Path(row_file.name).read_text()) if done.ok else None
        row = row or {"run": run, "error": done.describe(), "stderr_tail": done.tail}
        report["rows"].append(row)
        print({k: v for k, v in row.items() if k != "recipe"}, flush=True)
    finish_report(report, out, markdown(report))


if __name__ == "__main__":
    main()

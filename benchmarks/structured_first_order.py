"""Issue 20: is there signal in group OBS's first-order term, and in the rankings, when pruning starts from the
pre-trained MiniLM?

For each FFN block's consumer (the down projection) and two independent draws of `--examples` calibration examples,
this records group OBS's quadratic cost ½ tr(W_Pᵀ G W_P [H⁻¹_PP]⁻¹) per neuron, the first-order term g·δW that
`curvature.first_order` adds (g the mean data-label gradient), and the Taylor importance E[(Σ g·w)²] — at the
pre-trained start (fresh head, step 0: where the B1 `--start pretrained` schedule takes its first 30 %) and after
`--steps` optimizer steps of plain fine-tuning (where `--window 0.2,0.8` takes it). Per block: the scales (median
quadratic cost, spread of the first-order term) and the split-half Spearman correlation of each score between the
two draws: near 1 the ranking is a property of the model, near 0 of the sample.

    python -m benchmarks.structured_first_order             # results/structured_first_order.json
    python -m benchmarks.structured_first_order --quick     # a smoke run: 8 examples, the pre-trained state only
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from fls_hf.model import ffn_blocks
from fls_hf.pruning import Pruner, structured

from .common import minilm
from .common.paths import RESULTS

DAMPING = 1e-2  # λ = 1e-2 × mean diag Ā, as the B1 kfac rows


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    ranks = [torch.argsort(torch.argsort(v)).double() for v in (x, y)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def scores(model, batches) -> dict[str, dict[str, torch.Tensor]]:
    """Per FFN consumer: quadratic cost, first-order term and Taylor importance of every neuron on `batches`."""
    blocks = ffn_blocks(model)
    kfac = Pruner(
        model, recipe("kfac", {"num_examples": len(batches) * len(batches[0]["labels"]), "first_order": True})
    )
    kfac.provider.ready(model, batches)
    taylor = Pruner(model, recipe("taylor", {"num_batches": len(batches)}))
    taylor.provider.ready(model, batches)
    out = {}
    for block in blocks:
        name = block.consumer
        w = model.get_submodule(name).weight.detach().double()
        h_inv = structured.damped_inverse(kfac.provider.row_model(name).a_bar(), DAMPING)
        g = kfac.provider.output_factor(name)
        quadratic = structured.group_costs(w, g, h_inv, 1)
        gradient = kfac.provider.mean_gradient(name).double()
        out[name] = {
            "quadratic": quadratic,
            "first_order": structured.group_costs(w, g, h_inv, 1, gradient=gradient) - quadratic,
            "taylor": taylor.provider.group_importance(name, 1),
        }
    return out


def recipe(method: str, curvature: dict) -> dict:
    return minilm.recipe(method, curvature, mask_type="neurons", global_sparsity=False, final_sparsity=0.5)


def draw(train, examples: int, batch_size: int, seed: int) -> list[dict]:
    loader = minilm.loader(train, batch_size, shuffle=True, seed=seed)
    batches = []
    for batch in loader:
        if len(batches) * batch_size >= examples:
            break
        batches.append(dict(batch))
    return batches


def compare(first: dict, second: dict) -> list[dict]:
    rows = []
    for name in first:
        a, b = first[name], second[name]
        rows.append(
            {
                "consumer": name,
                "quadratic_median": float(a["quadratic"].median()),
                "first_order_std": float(a["first_order"].std()),
                "first_order_over_quadratic": float(a["first_order"].abs().median() / a["quadratic"].median()),
                "split_half_quadratic": spearman(a["quadratic"], b["quadratic"]),
                "split_half_first_order": spearman(a["first_order"], b["first_order"]),
                "split_half_taylor": spearman(a["taylor"], b["taylor"]),
                "quadratic_vs_taylor": spearman(a["quadratic"], a["taylor"]),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=47, help="fine-tuning steps before the second look (20 %)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = minilm.splits()
    train = data["train"].select(range(64)) if args.quick else data["train"]
    examples, steps, batch_size = (8, 0, 4) if args.quick else (args.examples, args.steps, 32)
    model = minilm.pretrained_model(args.seed)
    report = {"settings": {"examples": examples, "steps": steps, "seed": args.seed, "damping": DAMPING}, "states": {}}
    for state in ("pretrained",) if args.quick else ("pretrained", f"after {steps} steps"):
        if state != "pretrained":
            training = TrainingArguments(
                output_dir=tempfile.mkdtemp(prefix="first-order-"),
                max_steps=steps,
                per_device_train_batch_size=batch_size,
                learning_rate=5e-5,
                seed=args.seed,
                use_cpu=True,
                report_to=[],
                save_strategy="no",
                disable_tqdm=True,
            )
            collator = DataCollatorWithPadding(minilm.tokenizer())
            Trainer(model=model, args=training, train_dataset=train, data_collator=collator).train()
        first, second = (scores(model, draw(train, examples, batch_size, seed)) for seed in (101, 202))
        report["states"][state] = compare(first, second)
        for row in report["states"][state]:
            print(
                f"{state:16s} {row['consumer'].split('encoder.')[-1]:24s} quad {row['quadratic_median']:.2e}  "
                f"|fo|/quad {row['first_order_over_quadratic']:9.1f}  split-half quad "
                f"{row['split_half_quadratic']:+.2f} fo {row['split_half_first_order']:+.2f} taylor "
                f"{row['split_half_taylor']:+.2f}  quad~taylor {row['quadratic_vs_taylor']:+.2f}",
                flush=True,
            )
    out = RESULTS / "structured_first_order.json" if args.output is None else args.output
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

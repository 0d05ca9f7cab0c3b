"""Issue 18: the cg solver's preconditioner on real MiniLM layer problems — CPU time and loss of the update.

One-shot MiniLM runs (`pruning.method: kfac`, row-wise OBC, `obc_solver: cg`, 256 calibration examples) at 2:4,
50 % and 80 % unstructured hand every layer's row problems to the solver; this script records them (Ā, its
eigenbasis, G_ii, γ, each row's kept set and right-hand side) and solves each layer three ways:

- `woodbury`: `conjugate_gradient.cg_rows` as shipped (low-rank Woodbury preconditioner, tolerance `CG_TOLERANCE`);
- `restricted`: the preconditioner it replaced, M_i = [H_i⁻¹]_KK through Ā's eigenbasis, at that solver's own
  tolerance (3e-3), kept here as the reference (`RestrictedInverse`, in the same iteration);
- `factorised`: `obc.obc_solve` without CG (a float32 Cholesky per row, refined in float64).

Per setting: total CPU seconds over the layers (`time.process_time`, both cores), the largest relative excess of an
update's loss over the exact update's (on sampled rows: ½ xᵀH_KK x − bᵀx against a float64 solve), and rows left
unconverged (they go to the factorisations in the package).

    python -m benchmarks.cg_preconditioner                 # results/cg_preconditioner.json
    python -m benchmarks.cg_preconditioner --quick         # a smoke run: tiny dense model, 2:4, two layers

Run it alone on the machine: it reports CPU time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import time
from pathlib import Path

import torch

from fls_hf import oneshot
from fls_hf.pruning import conjugate_gradient, obc

from .common import minilm
from .common.paths import RESULTS
from .common.rows import finish_report

SETTINGS = {
    "2:4": {"mask_type": "2:4", "global_sparsity": False, "final_sparsity": 0.5},
    "50 %": {"final_sparsity": 0.5},
    "80 %": {"final_sparsity": 0.8},
}
RESTRICTED_TOLERANCE = 3e-3  # the replaced preconditioner's default


def layer_problems(dense, batches, setting: dict) -> list[dict]:
    """Prune a copy of `dense` one-shot and keep what the cg solver was handed for each layer."""
    problems = []
    choose = obc._by_conjugate_gradients

    def record(coupling, a_bar, model, keep, active, factored, tolerance, delta):
        problems.append(
            {"coupling": coupling[active], "a_bar": a_bar, "model": model, "rows": active, "keep": keep[active]}
        )
        return choose(coupling, a_bar, model, keep, active, factored, tolerance, delta)

    examples = sum(len(b["input_ids"]) for b in batches)  # each example seen once
    curvature = {"num_examples": examples, "num_batches": len(batches), "damping": 1e-2}
    recipe = minilm.recipe("kfac", curvature, compensation="obc", obc_solver="cg", **setting)
    obc._by_conjugate_gradients = record
    try:
        oneshot(copy.deepcopy(dense), batches, recipe)
    finally:
        obc._by_conjugate_gradients = choose
    return [p for p in problems if len(p["rows"])]


class RestrictedInverse:
    """The replaced preconditioner, M_i = [U diag(1 / (G_ii λ + γ)) Uᵀ]_KK: the row Hessian's inverse restricted to
    K, through Ā's eigenbasis (two cols² GEMMs per application)."""

    def __init__(self, model, a_bar, rows, mask):
        self.basis = model.basis.to(mask.dtype)
        self.spectrum = model.spectrum(rows).to(mask.dtype)
        self.mask = mask

    def __call__(self, r):
        return (((r @ self.basis) * self.spectrum) @ self.basis.T) * self.mask

    def select(self, index):
        self.spectrum, self.mask = self.spectrum[index], self.mask[index]


def loss_excess(x, problem, sample: int = 8) -> float:
    """Largest (L(x) − L*) / |L*| over `sample` rows, L(x) = ½ xᵀ H_KK x − bᵀx, L* from a float64 solve."""
    a, model = problem["a_bar"].double(), problem["model"]
    worst = 0.0
    for i in torch.linspace(0, len(x) - 1, min(sample, len(x))).long().tolist():
        k = problem["keep"][i].nonzero().squeeze(1)
        if not len(k):
            continue
        g = float(model.row_weight[problem["rows"][i]])
        h = g * a[k][:, k] + model.damping * torch.eye(len(k), dtype=a.dtype)
        b = problem["coupling"][i, k].double()
        best = torch.linalg.solve(h, b)

        def loss(v, h=h, b=b):
            return float(0.5 * v @ h @ v - b @ v)

        optimum = loss(best)
        worst = max(worst, (loss(x[i, k].double()) - optimum) / max(abs(optimum), 1e-300))
    return worst


def solve_all(problems: list[dict], method: str) -> dict:
    seconds, excess, unconverged = 0.0, 0.0, 0
    for problem in problems:
        args = (problem["coupling"], problem["a_bar"], problem["model"], problem["rows"], problem["keep"])
        if method == "factorised":  # the same work as for the real weights: the values do not matter
            w = torch.randn(problem["keep"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            model = dataclasses.replace(problem["model"], row_weight=problem["model"].row_weight[problem["rows"]])
            start = time.process_time()
            obc.obc_solve(w, model, problem["keep"], inverse_diag=False)
            seconds += time.process_time() - start
            continue
        start = time.process_time()
        if method == "woodbury":
            x, converged = conjugate_gradient.cg_rows(*args)
        else:
            x, converged = conjugate_gradient.cg_rows(
                *args, tolerance=RESTRICTED_TOLERANCE, preconditioner_class=RestrictedInverse
            )
        seconds += time.process_time() - start
        excess = max(excess, loss_excess(x, problem))
        unconverged += int((~converged).sum())
    row = {"method": method, "cpu_seconds": round(seconds, 2)}
    return row if method == "factorised" else {**row, "loss_excess": excess, "unconverged_rows": unconverged}


def markdown(report: dict) -> str:
    lines = [
        "| setting | layers | rows | woodbury: CPU s | loss excess | restricted: CPU s | loss excess "
        "| factorised: CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["settings_measured"]:
        by = {r["method"]: r for r in entry["rows"]}
        wood, old = by["woodbury"], by["restricted"]
        lines.append(
            f"| {entry['setting']} | {entry['layers']} | {entry['problem_rows']} | {wood['cpu_seconds']} | "
            f"{wood['loss_excess']:.1e} | {old['cpu_seconds']} | {old['loss_excess']:.1e} | "
            f"{by['factorised']['cpu_seconds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: the quick dense model, 64 examples, 2:4 only, two layers"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = minilm.splits()
    if args.quick:
        data = {k: v.select(range(64)) for k, v in data.items()}
    dense_dir = minilm.QUICK_DENSE_DIR if args.quick else minilm.DENSE_DIR
    dense = minilm.dense_model(data, directory=dense_dir)
    batches = list(minilm.loader(data["train"].select(range(256 if not args.quick else 64)), 32))
    report = {
        "settings": {
            "quick": args.quick,
            "dense_checkpoint": minilm.checkpoint_id(dense_dir),
            "cg_tolerance": conjugate_gradient.CG_TOLERANCE,
            "restricted_tolerance": RESTRICTED_TOLERANCE,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "settings_measured": [],
    }
    for name, setting in list(SETTINGS.items())[: 1 if args.quick else None]:
        problems = layer_problems(dense, batches, setting)[: 2 if args.quick else None]
        rows = [solve_all(problems, method) for method in ("woodbury", "restricted", "factorised")]
        entry = {"setting": name, "layers": len(problems), "problem_rows": sum(len(p["rows"]) for p in problems)}
        report["settings_measured"].append({**entry, "rows": rows})
        print(entry, rows, flush=True)
    out = (
        Path(args.output)
        if args.output
        else RESULTS / ("cg_preconditioner_quick.json" if args.quick else "cg_preconditioner.json")
    )
    finish_report(report, out, markdown(report))


if __name__ == "__main__":
    main()

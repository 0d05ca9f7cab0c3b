"""B4 / issue 6: how good is the inverse Fisher? FishLeg's Q against empirical-Fisher inverses and the exact one.

The command line, `python -m benchmarks.inverse_quality [--quick] [--aux_lr LR] [--output PATH]`: builds the problem,
runs every comparison at each damping, writes the JSON, prints the tables and draws the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ..common.paths import RESULTS
from .checks import package_checks
from .empirical import empirical_study
from .fishleg import AUX_BATCH, KFAC_EXAMPLES, fishleg_study
from .metrics import SPARSITIES, obs_prune, quality
from .problem import build_problem, describe, make_data, train_mlp
from .report import plot, summary
from .structures import BLOCK, references

SETTINGS = {
    "full": {
        "dampings": (1e-4, 1e-2),
        "ks": (1, 10, 100, 1000, 10000),
        "repeats": 3,
        "checkpoints": (0, 100, 300, 1000, 3000, 6000),
    },
    # a smoke run: one damping (each costs the same again), three K values, a few aux steps
    "quick": {"dampings": (1e-4,), "ks": (1, 100, 3000), "repeats": 1, "checkpoints": (0, 5, 15)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one damping, fewer K values, one repeat, few aux steps (smoke run)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON path (default results/inverse_quality[_quick].json)"
    )
    parser.add_argument(
        "--aux_lr", type=float, default=1e-2, help="FishLeg's Adam learning rate (the package default is 1e-2)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = SETTINGS["quick" if args.quick else "full"]
    output = args.output or RESULTS / ("inverse_quality_quick.json" if args.quick else "inverse_quality.json")
    began = time.perf_counter()

    data = make_data()
    problem = build_problem(data, train_mlp(data))
    results = {
        "command": " ".join(["python -m benchmarks.inverse_quality", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
        "setup": {
            **describe(problem),
            "dampings": list(settings["dampings"]),
            "ks": list(settings["ks"]),
            "repeats": settings["repeats"],
            "aux_checkpoints": list(settings["checkpoints"]),
            "aux_batch": AUX_BATCH,
            "aux_lr": args.aux_lr,
            "aux_lr_schedule": "linear to 0.1 × over the run",
            "kfac_examples": KFAC_EXAMPLES,
            "block_size": BLOCK,
            "sparsities": list(SPARSITIES),
        },
        "checks": package_checks(problem),
        "dampings": {},
    }
    for gamma in settings["dampings"]:
        refs = references(problem, gamma)
        exact = refs["full/projection"]
        masks = {s: set(obs_prune(exact, problem.w, s)[0].tolist()) for s in SPARSITIES}
        results["dampings"][f"{gamma:g}"] = {
            "exact": quality(problem, exact, exact, masks),
            "magnitude": quality(problem, torch.eye(len(problem.w), dtype=torch.float64) / gamma, exact, masks),
            "references": {k: quality(problem, q, exact, masks) for k, q in refs.items()},
            "empirical": empirical_study(problem, gamma, exact, masks, settings["ks"], settings["repeats"]),
            "fishleg": fishleg_study(problem, gamma, refs, masks, settings["checkpoints"], args.aux_lr),
        }
    results["seconds"] = time.perf_counter() - began

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))
    print(f"wrote {output} in {results['seconds']:.0f} s")
    try:
        plot(results, output.with_suffix(".png"))
        print(f"wrote {output.with_suffix('.png')}")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")


if __name__ == "__main__":
    main()

"""Smoke test of `python -m benchmarks.inverse_quality --quick` (B4): the JSON it writes is complete and sane."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from helpers import run_quick_study

REPO = Path(__file__).resolve().parents[2]
STRUCTURES = ("full", "layer", "block_diagonal", "diagonal")
FISHLEG = {f"{s}/{i}" for s in ("diagonal", "block_diagonal", "kronecker") for i in ("kfac", "identity")}


def numbers(node, path="$"):
    """Every number in a JSON tree with its path (None is allowed: a metric that does not apply)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from numbers(value, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("b4") / "x.json"
    report, _ = run_quick_study("inverse_quality", out, in_process=True)
    return out, report


def test_keys_and_finite_numbers(quick_run):
    out, results = quick_run
    assert {"command", "machine", "setup", "checks", "dampings", "seconds"} <= set(results)
    assert "--quick" in results["command"]
    setup = results["setup"]
    assert list(results["dampings"]) == [f"{g:g}" for g in setup["dampings"]] and setup["dampings"]
    bad = [(path, value) for path, value in numbers(results) if not math.isfinite(value)]
    assert not bad, bad[:5]
    for res in results["dampings"].values():
        assert {"exact", "magnitude", "references", "empirical", "fishleg"} == set(res)
        assert set(res["empirical"]) == {"data", "sampled"}
        for by_structure in res["empirical"].values():
            assert set(by_structure) == set(STRUCTURES)
            for by_k in by_structure.values():
                assert [int(k) for k in by_k] == setup["ks"]
                for m in by_k.values():
                    assert {"rel_fro", "rel_diag", "spearman", "pruning"} <= set(m)
                    assert set(m["pruning"]) == {f"{s:g}" for s in setup["sparsities"]}
                    assert {"predicted_self", "predicted_quadratic", "actual", "overlap_with_exact"} <= set(
                        m["pruning"]["0.5"]
                    )
        assert set(res["fishleg"]) == FISHLEG
        for rows in res["fishleg"].values():
            assert [r["aux_steps"] for r in rows] == setup["aux_checkpoints"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 10_000


def test_exact_quantities_match_the_package(quick_run):
    """Our float64 Jacobians give the package's per-example gradients and GGN products (fp32 there)."""
    _, results = quick_run
    assert results["checks"]["per_example_gradient_rel_diff"] < 1e-4
    assert results["checks"]["ggn_product_rel_diff"] < 1e-4


def test_references_and_identity_start(quick_run):
    """The full-structure references are the exact inverse; FishLeg's identity start is magnitude (Q = I/γ)."""
    _, results = quick_run
    for res in results["dampings"].values():
        for key in ("full/projection", "full/aux_optimum"):
            assert res["references"][key]["rel_fro"] < 1e-9
            assert res["references"][key]["spearman"] == pytest.approx(1.0)
            assert res["references"][key]["pruning"]["0.3"]["overlap_with_exact"] == 1.0
        assert res["exact"]["rel_fro"] < 1e-9
        # projections keep the exact diagonal: same saliencies, same diag error 0
        assert res["references"]["diagonal/projection"]["rel_diag"] < 1e-9
        for structure in ("diagonal", "block_diagonal", "kronecker"):
            start = res["fishleg"][f"{structure}/identity"][0]
            assert start["rel_fro"] == pytest.approx(res["magnitude"]["rel_fro"], rel=1e-5)


def test_empirical_fisher_error_falls_with_more_gradients(quick_run):
    _, results = quick_run
    for res in results["dampings"].values():
        for labels in ("data", "sampled"):
            full = res["empirical"][labels]["full"]
            ks = sorted(full, key=int)
            assert full[ks[-1]]["rel_fro"] < 0.7 * full[ks[0]]["rel_fro"], (
                labels,
                full[ks[0]]["rel_fro"],
                full[ks[-1]]["rel_fro"],
            )
            # and exact OBS under the converged estimate loses less when pruning half the weights than under K = 1
            assert full[ks[-1]]["pruning"]["0.5"]["actual"] < full[ks[0]]["pruning"]["0.5"]["actual"]

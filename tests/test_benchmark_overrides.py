"""The gradual benchmarks' `--set` overrides: which method gets which curvature key, and the row names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from overrides import parse_overrides, row_name  # noqa: E402


def test_unscoped_keys_reach_every_method_and_scoped_keys_only_theirs():
    pairs = ["damping=1e-4", "fls.init=diagonal", "obert.block_size=16"]
    assert parse_overrides(pairs, "fls") == {"damping": 1e-4, "init": "diagonal"}
    assert parse_overrides(pairs, "obert") == {"damping": 1e-4, "block_size": 16}
    assert parse_overrides(pairs, "gmp") == {"damping": 1e-4}


def test_values_parse_as_json_else_text_and_names_carry_them():
    overrides = parse_overrides(["aux_lr=1e-2", "structure=kronecker", "steps=5", "flag=true"], "fls")
    assert overrides == {"aux_lr": 0.01, "structure": "kronecker", "steps": 5, "flag": True}
    assert row_name("fls", overrides) == "fls[aux_lr=0.01,structure=kronecker,steps=5,flag=True]"
    assert row_name("gmp", {}) == "gmp"


@pytest.mark.bad_input
@pytest.mark.parametrize("pair", ["damping", "=1e-4", "fls.=3"])
def test_malformed_pairs_are_refused_naming_the_pair(pair):
    with pytest.raises(SystemExit, match="key=value"):
        parse_overrides([pair], "fls")

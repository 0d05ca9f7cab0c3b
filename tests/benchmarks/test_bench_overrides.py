"""The gradual benchmarks' `--set` overrides: which method gets which curvature key, the values, and the row names."""

from __future__ import annotations

import pytest

from benchmarks.common.overrides import parse_overrides, row_name


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


def test_values_parse_as_the_recipes_overrides_do():
    """YAML values, as `--recipe_args`: an N:M pattern stays text, `null` is None, a YAML float is a float."""
    overrides = parse_overrides(["mask_type=2:4", "init=null", "rewarm=True", "aux_lr=1.0e-3", "damping=1E-8"], "fls")
    assert overrides == {"mask_type": "2:4", "init": None, "rewarm": True, "aux_lr": 1e-3, "damping": 1e-8}


@pytest.mark.bad_input
def test_a_value_that_is_not_yaml_is_refused_naming_the_pair():
    with pytest.raises(SystemExit, match=r"damping=\[1"):
        parse_overrides(["damping=[1"], "fls")

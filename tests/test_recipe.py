"""Recipes: shipped files load and round-trip; every bad input is rejected with a dotted-key message."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fls_hf.curvature import CurvatureConfig, CurvatureProvider, config_class_for, registered_methods
from fls_hf.curvature import base as curvature_base
from fls_hf.errors import RecipeError
from fls_hf.recipe import PruningConfig, PruningRecipe, load_recipe, parse_overrides

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
MAG = {"method": "magnitude"}


def _shipped(path: Path) -> PruningRecipe:
    method = yaml.safe_load(path.read_text())["pruning"]["method"]
    if method not in registered_methods():
        pytest.skip(f"{path.name}: curvature method {method!r} is not registered yet")
    return load_recipe(path)


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {
        "oneshot-unstructured-50.yaml",
        "gradual-unstructured-80.yaml",
        "gradual-unstructured-90.yaml",
        "gradual-2of4.yaml",
    } <= names
    for method in ("magnitude", "diagonal_fisher", "block_fisher"):
        assert f"gradual-unstructured-90-{method}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_and_round_trips(path: Path, tmp_path: Path):
    assert path.read_text().startswith("#") and "optimizer steps" in path.read_text()
    recipe = _shipped(path)
    assert type(recipe.curvature) is config_class_for(recipe.pruning.method)
    assert load_recipe(recipe.to_yaml()) == recipe
    assert load_recipe(recipe.save(tmp_path / "out" / "recipe.yaml")) == recipe
    assert load_recipe(str(tmp_path / "out" / "recipe.yaml")) == recipe


@pytest.mark.parametrize("path", [p for p in RECIPES if "90" in p.name], ids=lambda p: p.name)
def test_gradual_90_family_differs_only_in_method(path: Path):
    reference = yaml.safe_load((path.parent / "gradual-unstructured-90.yaml").read_text())
    variant = yaml.safe_load(path.read_text())
    reference["pruning"].pop("method"), variant["pruning"].pop("method")
    assert variant["pruning"] == reference["pruning"]


def test_shipped_targets_match_bert_linears():
    from fls_hf.model.targets import resolve_targets

    from helpers import tiny_bert

    recipe = load_recipe(RECIPES[0].parent / "gradual-unstructured-90-magnitude.yaml")
    names = resolve_targets(tiny_bert(), recipe.pruning.targets, recipe.pruning.ignore)
    assert len(names) == 2 * 6  # query, key, value, attention.output, intermediate, output per layer
    assert not any("pooler" in n or "classifier" in n for n in names)


def test_defaults_and_type_coercion():
    recipe = load_recipe(
        {
            "pruning": {**MAG, "targets": "re:.*query", "end_step": 600.0},
            "curvature": {"damping": "1e-3", "max_memory_gib": 2},
        }
    )
    assert recipe.pruning.targets == ["re:.*query"]
    assert recipe.pruning.end_step == 600 and type(recipe.pruning.end_step) is int
    assert recipe.curvature.damping == 1e-3 and recipe.curvature.max_memory_gib == 2.0
    assert recipe.pruning.ignore == ["classifier", "re:.*pooler.*", "lm_head", "score"]
    assert load_recipe({"pruning": MAG, "curvature": None}).curvature == CurvatureConfig()
    assert load_recipe({"pruning": MAG}, {"curvature.max_memory_gib": None}).curvature.max_memory_gib is None


def test_yaml_string_reads_exponents_written_without_a_dot():
    text = "pruning:\n  method: magnitude\n  mask_type: '4:8'\ncurvature:\n  damping: 1e-4\n"
    recipe = load_recipe(text)
    assert recipe.curvature.damping == pytest.approx(1e-4) and recipe.pruning.n_of_m == (4, 8)
    assert "'4:8'" in recipe.to_yaml() and load_recipe(recipe.to_yaml()) == recipe


def test_overrides_apply_before_validation_and_do_not_mutate_the_source():
    source = {"pruning": {**MAG, "init_sparsity": 0.3, "final_sparsity": 0.9}}
    recipe = load_recipe(source, overrides={"pruning.final_sparsity": 0.8, "curvature.damping": "1e-2"})
    assert recipe.pruning.final_sparsity == 0.8 and recipe.curvature.damping == 0.01
    assert source == {"pruning": {**MAG, "init_sparsity": 0.3, "final_sparsity": 0.9}}
    # init 0.95 > final 0.9 in the source is fine once the override lifts final.
    assert load_recipe({"pruning": {**MAG, "init_sparsity": 0.95}}, {"pruning.final_sparsity": 0.96})


def test_recipe_source_is_copied():
    recipe = load_recipe({"pruning": {**MAG, "targets": ["a"]}})
    copy = load_recipe(recipe, {"pruning.final_sparsity": 0.7})
    copy.pruning.targets.append("b")
    assert recipe.pruning.targets == ["a"] and recipe.pruning.final_sparsity == 0.5
    assert load_recipe(recipe) == recipe and load_recipe(recipe) is not recipe


def test_parse_overrides():
    parsed = parse_overrides(
        [
            "pruning.final_sparsity=0.8",
            "curvature.damping=1e-4",
            "pruning.mask_type=2:4",
            "pruning.targets=re:.*\\.query",
            "pruning.global_sparsity=false",
        ]
    )
    assert parsed == {
        "pruning.final_sparsity": 0.8,
        "curvature.damping": 1e-4,
        "pruning.mask_type": "2:4",
        "pruning.targets": "re:.*\\.query",
        "pruning.global_sparsity": False,
    }
    recipe = load_recipe({"pruning": MAG}, parsed)
    assert recipe.curvature.damping == pytest.approx(1e-4) and recipe.pruning.n_of_m == (2, 4)
    with pytest.raises(RecipeError, match=r"override 'pruning\.final_sparsity' must look like `section\.key=value`"):
        parse_overrides(["pruning.final_sparsity"])


def test_direct_construction_is_validated():
    assert PruningConfig(final_sparsity="0.7").final_sparsity == 0.7
    assert PruningConfig(start_step=3, end_step=3).one_shot
    with pytest.raises(RecipeError, match=r"`pruning\.final_sparsity` = 1\.5 is out of range"):
        PruningConfig(final_sparsity=1.5)
    with pytest.raises(RecipeError, match=r"`pruning\.update_frequency` = True has the wrong type: expected int"):
        PruningConfig(update_frequency=True)


@dataclass
class _ToyConfig(CurvatureConfig):
    """A method-specific curvature section, registered only inside one test."""

    probes: int = field(default=4, metadata={"help": "test knob"})


class _ToyProvider(CurvatureProvider):
    config_class = _ToyConfig

    def diag(self, name):
        raise NotImplementedError

    def matvec(self, name, vector):
        raise NotImplementedError


def test_curvature_section_follows_the_registered_method(monkeypatch):
    monkeypatch.setitem(curvature_base._CONFIGS, "toy", _ToyConfig)
    monkeypatch.setitem(curvature_base._PROVIDERS, "toy", _ToyProvider)
    recipe = load_recipe({"pruning": {"method": "toy"}, "curvature": {"probes": 8.0}})
    assert type(recipe.curvature) is _ToyConfig and recipe.curvature.probes == 8
    assert load_recipe(recipe.to_yaml()) == recipe
    with pytest.raises(RecipeError, match=r"`curvature\.probes` is unknown; valid keys of CurvatureConfig"):
        load_recipe(recipe, {"pruning.method": "magnitude"})
    with pytest.raises(RecipeError, match=r"`curvature\.prbes` is unknown \(did you mean `curvature\.probes`\?\)"):
        load_recipe({"pruning": {"method": "toy"}, "curvature": {"prbes": 8}})
    with pytest.raises(RecipeError, match=r"is a CurvatureConfig, but `pruning\.method` = 'toy' expects a _ToyConfig"):
        PruningRecipe(PruningConfig(method="toy"), CurvatureConfig())
    assert PruningRecipe(PruningConfig(method="toy")).curvature == _ToyConfig()


def _p(**pruning):
    return {"pruning": {**MAG, **pruning}}


# (case id, source, overrides, message pattern): every one must raise RecipeError matching the pattern.
BAD_INPUTS = [
    (
        "malformed yaml",
        "pruning:\n  final_sparsity: [0.5\n",
        None,
        r"(?s)recipe string is not valid YAML: .*in string, line 2, column 19",
    ),
    ("tab-indented yaml", "pruning:\n\tmethod: magnitude\n", None, r"(?s)not valid YAML: .*line 2"),
    ("missing file", "recipes/does-not-exist.yaml", None, r"recipe file 'recipes/does-not-exist\.yaml' does not exist"),
    ("scalar document", "just words", None, r"a recipe must be a mapping of keys to values, got str 'just words'"),
    ("section not a mapping", {"pruning": [0.5]}, None, r"recipe section `pruning` must be a mapping"),
    ("unknown top-level key", {"prunning": {}}, None, r"recipe key `prunning` is unknown \(did you mean `pruning`\?\)"),
    (
        "field outside its section",
        {"final_sparsity": 0.5},
        None,
        r"`final_sparsity` is unknown \(did you mean `pruning\.final_sparsity`\?\)",
    ),
    (
        "unknown nested key",
        _p(final_sparsty=0.5),
        None,
        r"`pruning\.final_sparsty` is unknown \(did you mean `pruning\.final_sparsity`\?\)",
    ),
    (
        "curvature key under pruning",
        _p(damping=0.1),
        None,
        r"`pruning\.damping` is unknown \(did you mean `curvature\.damping`\?\)",
    ),
    (
        "unknown key, no near match",
        _p(xyzzy=1),
        None,
        r"`pruning\.xyzzy` is unknown; valid keys of PruningConfig: method, targets",
    ),
    (
        "unknown curvature key",
        {"pruning": MAG, "curvature": {"dampng": 1.0}},
        None,
        r"`curvature\.dampng` is unknown \(did you mean `curvature\.damping`\?\)",
    ),
    ("string for int", _p(start_step="ten"), None, r"`pruning\.start_step` = 'ten' has the wrong type: expected int"),
    (
        "bool for int",
        _p(update_frequency=True),
        None,
        r"`pruning\.update_frequency` = True has the wrong type: expected int",
    ),
    (
        "fractional float for int",
        _p(end_step=10.5),
        None,
        r"`pruning\.end_step` = 10\.5 has the wrong type: expected int",
    ),
    (
        "bool for float",
        _p(final_sparsity=True),
        None,
        r"`pruning\.final_sparsity` = True has the wrong type: expected float",
    ),
    (
        "word for float",
        _p(final_sparsity="half"),
        None,
        r"`pruning\.final_sparsity` = 'half' has the wrong type: expected float",
    ),
    (
        "string for bool",
        _p(global_sparsity="yes"),
        None,
        r"`pruning\.global_sparsity` = 'yes' has the wrong type: expected bool",
    ),
    (
        "int in list[str]",
        _p(targets=["query", 3]),
        None,
        r"`pruning\.targets\[1\]` = 3 has the wrong type: expected str",
    ),
    (
        "string for float | None",
        {"pruning": MAG, "curvature": {"max_memory_gib": "lots"}},
        None,
        r"`curvature\.max_memory_gib` = 'lots' has the wrong type: expected float \| None",
    ),
    (
        "unquoted 2:4",
        "pruning:\n  method: magnitude\n  mask_type: 2:4\n",
        None,
        r"`pruning\.mask_type` = 124 has the wrong type: expected str \(quote it",
    ),
    (
        "sparsity above 1",
        _p(final_sparsity=1.2),
        None,
        re.escape("recipe key `pruning.final_sparsity` = 1.2 is out of range: expected 0 <= value < 1"),
    ),
    (
        "sparsity equal to 1",
        _p(final_sparsity=1),
        None,
        r"`pruning\.final_sparsity` = 1\.0 is out of range: expected 0 <= value < 1",
    ),
    ("NaN sparsity", _p(final_sparsity=float("nan")), None, r"`pruning\.final_sparsity` = nan is out of range"),
    ("negative sparsity", _p(init_sparsity=-0.1), None, r"`pruning\.init_sparsity` = -0\.1 is out of range"),
    (
        "init above final",
        _p(init_sparsity=0.9, final_sparsity=0.5),
        None,
        r"`pruning\.init_sparsity` = 0\.9 is inconsistent: expected init_sparsity <= `pruning\.final_sparsity` \(= "
        r"0\.5\)",
    ),
    (
        "end before start",
        _p(start_step=100, end_step=50),
        None,
        r"`pruning\.end_step` = 50 is inconsistent: expected end_step >= `pruning\.start_step` \(= 100\)",
    ),
    (
        "negative start",
        _p(start_step=-1, end_step=0),
        None,
        r"`pruning\.start_step` = -1 is out of range: expected value >= 0",
    ),
    (
        "zero update frequency",
        _p(update_frequency=0),
        None,
        r"`pruning\.update_frequency` = 0 is out of range: expected value >= 1",
    ),
    (
        "zero recomputations",
        _p(recomputations=0),
        None,
        r"`pruning\.recomputations` = 0 is out of range: expected value >= 1",
    ),
    ("zero obs block", _p(obs_block_size=0), None, r"`pruning\.obs_block_size` = 0 is out of range"),
    (
        "layer bounds crossed",
        _p(min_layer_sparsity=0.6, max_layer_sparsity=0.4),
        None,
        r"`pruning\.min_layer_sparsity` = 0\.6 is inconsistent",
    ),
    (
        "final above layer cap",
        _p(final_sparsity=0.95, max_layer_sparsity=0.9),
        None,
        r"`pruning\.final_sparsity` = 0\.95 is inconsistent: expected `pruning\.min_layer_sparsity`",
    ),
    ("N:M with N == M", _p(mask_type="4:4"), None, r"`pruning\.mask_type` = '4:4' needs 1 <= N < M"),
    ("N:M with N > M", _p(mask_type="4:2"), None, r"`pruning\.mask_type` = '4:2' needs 1 <= N < M"),
    ("N:M with N == 0", _p(mask_type="0:4"), None, r"`pruning\.mask_type` = '0:4' needs 1 <= N < M"),
    (
        "mask type typo",
        _p(mask_type="2-4"),
        None,
        r"`pruning\.mask_type` = '2-4' is not understood; allowed: unstructured, \"N:M\"",
    ),
    (
        "bad inter_func",
        _p(inter_func="quadratic"),
        None,
        r"`pruning\.inter_func` = 'quadratic' is not allowed: expected one of cubic, linear",
    ),
    (
        "bad compensation",
        _p(compensation="joint"),
        None,
        r"`pruning\.compensation` = 'joint' is not allowed: expected one of auto, obc, block, independent, none",
    ),
    (
        "bad saliency",
        _p(saliency="wanda"),
        None,
        r"`pruning\.saliency` = 'wanda' is not allowed: expected one of obs, obd",
    ),
    (
        "bad target regex",
        _p(targets=["re:(query"]),
        None,
        r"`pruning\.targets` = \['re:\(query'\] has 're:\(query', which is neither",
    ),
    ("empty ignore name", _p(ignore=[""]), None, r"`pruning\.ignore` = \[''\] has ''"),
    (
        "unknown method",
        _p(method="obs_magic"),
        None,
        r"`pruning\.method` = 'obs_magic' is unknown; registered: .*magnitude",
    ),
    ("zero damping", {"pruning": MAG, "curvature": {"damping": 0}}, None, r"`curvature\.damping` = 0\.0 must be > 0"),
    (
        "kfac labels it cannot take",
        {"pruning": {"method": "kfac"}, "curvature": {"fisher_labels": "expected"}},
        None,
        r"`curvature\.fisher_labels` = 'expected'; allowed for `kfac`: sampled, empirical",
    ),
    (
        "unknown statistics source",
        {"pruning": {"method": "kfac"}, "curvature": {"statistics": "steps"}},
        None,
        r"`curvature\.statistics` = 'steps'; allowed: pass, training",
    ),
    (
        "training statistics with absolute damping",
        {"pruning": {"method": "kfac"}, "curvature": {"statistics": "training", "damping_mode": "absolute"}},
        None,
        r"`curvature\.statistics` = 'training' needs `curvature\.damping_mode: relative`",
    ),
    (
        "unknown damping mode",
        {"pruning": {"method": "kfac"}, "curvature": {"damping_mode": "loss"}},
        None,
        r"`curvature\.damping_mode` = 'loss'; allowed: relative, absolute",
    ),
    (
        "damping mode on a method without it",
        {"pruning": MAG, "curvature": {"damping_mode": "relative"}},
        None,
        r"damping_mode",
    ),
    (
        "zero obc rounds",
        {"pruning": {"method": "kfac", "compensation": "obc", "obc_rounds": 0}},
        None,
        r"`pruning\.obc_rounds` = 0 is out of range",
    ),
    (
        "unknown obc solver",
        {"pruning": {"method": "kfac", "obc_solver": "fast"}},
        None,
        r"`pruning\.obc_solver` = 'fast' is not allowed: expected one of exact, joint, cg, sweep",
    ),
    (
        "negative damping",
        {"pruning": MAG},
        {"curvature.damping": "-1e-3"},
        r"`curvature\.damping` = -0\.001 must be > 0",
    ),
    (
        "zero calibration batches",
        {"pruning": MAG, "curvature": {"num_batches": 0}},
        None,
        r"`curvature\.num_batches` = 0 must be >= 1",
    ),
    (
        "bad likelihood",
        {"pruning": MAG, "curvature": {"likelihood": "poisson"}},
        None,
        r"`curvature\.likelihood` = 'poisson'; allowed: auto",
    ),
    (
        "override typo",
        {"pruning": MAG},
        {"pruning.final_sparsty": 0.8},
        r"`pruning\.final_sparsty` is unknown \(did you mean `pruning\.final_sparsity`\?\)",
    ),
    (
        "override unknown section",
        {"pruning": MAG},
        {"prune.final_sparsity": 0.8},
        r"override key `prune\.final_sparsity` is unknown \(did you mean `pruning\.final_sparsity`\?\)",
    ),
    (
        "override without section",
        {"pruning": MAG},
        {"final_sparsity": 0.8},
        r"override key `final_sparsity` must look like `section\.key` \(did you mean `pruning\.final_sparsity`\?\)",
    ),
    (
        "override too deep",
        {"pruning": MAG},
        {"pruning.targets.0": "x"},
        r"override key `pruning\.targets\.0` must look like `section\.key`",
    ),
    (
        "override out of range",
        {"pruning": MAG},
        {"pruning.final_sparsity": 1.2},
        r"`pruning\.final_sparsity` = 1\.2 is out of range",
    ),
    (
        "source of the wrong type",
        ["pruning"],
        None,
        r"recipe source must be a PruningRecipe, dict, path or YAML string, got list",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("case", "source", "overrides", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected(case, source, overrides, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(source, overrides)


def test_every_bad_input_is_rejected():
    rejected = []
    for case, source, overrides, _ in BAD_INPUTS:
        try:
            load_recipe(source, overrides)
        except RecipeError:
            rejected.append(case)
    assert rejected == [c[0] for c in BAD_INPUTS], f"accepted: {set(c[0] for c in BAD_INPUTS) - set(rejected)}"
    assert len(rejected) == len(BAD_INPUTS) == 59


@pytest.mark.bad_input
def test_malformed_file_error_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("pruning:\n  method: magnitude\n   final_sparsity: 0.5\n")
    with pytest.raises(RecipeError, match=rf"(?s)recipe {re.escape(str(path))} is not valid YAML: .*line 3"):
        load_recipe(path)


def test_pruning_config_reads_from_the_command_line():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(PruningConfig).parse_args_into_dataclasses(
        ["--method", "magnitude", "--final_sparsity", "0.8", "--targets", "query", "key", "--global_sparsity", "false"]
    )
    assert config == PruningConfig(
        method="magnitude", final_sparsity=0.8, targets=["query", "key"], global_sparsity=False
    )


def test_minimal_recipe_is_one_shot_outside_training_and_says_so():
    """`oneshot` cannot honour an `init_sparsity`: it prunes straight to `final_sparsity`, with one warning."""
    from fls_hf import oneshot

    from helpers import tiny_bert, token_batches

    minimal = {"pruning": {"method": "magnitude", "init_sparsity": 0.3, "final_sparsity": 0.8}}
    recipe = load_recipe(minimal)
    assert recipe.pruning.end_step is None and recipe.pruning.one_shot and recipe.pruning.last_step == 0
    with pytest.warns(
        UserWarning, match=r"`pruning.init_sparsity` = 0.3 has no effect: the schedule is one-shot"
    ) as record:
        report = oneshot(tiny_bert(), token_batches(n_batches=1), minimal)
    assert len(record) == 1 and report.zeros == round(0.8 * report.numel)
    assert load_recipe({"pruning": {"end_step": 10}}).pruning.update_frequency == 1  # given end_step: every step


def test_schedule_over_run_fills_only_what_the_recipe_leaves_unset():
    from fls_hf.recipe import schedule_over_run

    explicit = load_recipe({"pruning": {"start_step": 2, "end_step": 5}})
    assert schedule_over_run(explicit, 1000) is explicit
    derived = schedule_over_run(load_recipe({"pruning": {"start_step": 100}}), 1100).pruning
    assert (derived.start_step, derived.end_step, derived.update_frequency) == (100, 850, 75)
    assert schedule_over_run(load_recipe({"pruning": {"update_frequency": 7}}), 100).pruning.update_frequency == 7
    assert schedule_over_run(load_recipe({}), 0).pruning.end_step == 0  # no steps to spread over: one-shot at 0


@pytest.mark.parametrize("name", ["gradual-neurons-50.yaml", "gradual-neurons-75.yaml"])
def test_shipped_neurons_recipes_are_the_measured_b1_row(name):
    """The structured recipes carry the settings of B1's `fls-obc-rel-uniform` rows (benchmarks/README.md
    "Structured"); only the schedule (B1 fits it to its run's length) and the batches per estimate differ."""
    from benchmarks.gradual_minilm import METHODS

    # B1 fits the schedule to its run's length and applies the recipe to the encoder's linears by name
    free = {"init_sparsity", "final_sparsity", "start_step", "end_step", "update_frequency", "targets", "ignore"}
    row = METHODS["fls-obc-rel-uniform"]
    measured = load_recipe({**row, "pruning": {**row["pruning"], "mask_type": "neurons"}}).to_dict()
    shipped = load_recipe(RECIPES[0].parent / name).to_dict()
    assert {k: v for k, v in shipped["pruning"].items() if k not in free} == {
        k: v for k, v in measured["pruning"].items() if k not in free
    }
    assert {k: v for k, v in shipped["curvature"].items() if k != "num_batches"} == {
        k: v for k, v in measured["curvature"].items() if k != "num_batches"
    }
    assert shipped["pruning"]["init_sparsity"] == 0.3 and shipped["pruning"]["inter_func"] == "cubic"

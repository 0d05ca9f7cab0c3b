"""Typed pruning recipes: `pruning:` (what, how much, when) and `curvature:` (the method's settings).

Every key is checked early and by its dotted name: unknown keys at any level are rejected with the
nearest valid key, types are checked against the dataclass annotations, and ranges and consistency
are checked in `__post_init__`. `start_step` / `end_step` / `update_frequency` count optimizer steps.
This module is the only place recipe values are validated: it owns the choice lists and the N:M
grammar, and the code below it takes the typed values as given.

A minimal recipe (`pruning: {final_sparsity: 0.8}`) leaves `end_step` unset: `oneshot` prunes to
`final_sparsity` at once, and the Trainer spreads a cubic schedule over the first 3/4 of the run
(`schedule_over_run`), leaving the last quarter for recovery.

Example:
    >>> recipe = load_recipe("recipes/gradual-unstructured-90.yaml", overrides={"pruning.final_sparsity": 0.8})
    >>> load_recipe(recipe.to_yaml()) == recipe
    True
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .curvature.base import config_class_for
from .curvature.config import CurvatureConfig
from .errors import CurvatureError, RecipeError
from .model.structures import STRUCTURE_KINDS
from .progress import log_main

__all__ = [
    "COMPENSATIONS",
    "INTER_FUNCS",
    "SALIENCIES",
    "PruningConfig",
    "PruningRecipe",
    "load_recipe",
    "parse_mask_type",
    "parse_overrides",
    "schedule_over_run",
]

SECTIONS = ("pruning", "curvature")
INTER_FUNCS = ("cubic", "linear")
COMPENSATIONS = ("auto", "obc", "block", "independent", "none")
SALIENCIES = ("obs", "obd")
OBC_SOLVERS = ("exact", "joint", "cg", "sweep")
STRUCTURES = (*STRUCTURE_KINDS, "+".join(STRUCTURE_KINDS))  # `pruning.mask_type` values removing whole structures
STRUCTURE_METHODS = ("kfac", "magnitude", "taylor")  # group OBS (K-FAC statistics) | column norms | first-order
STRUCTURE_ONLY_METHODS = ("taylor",)  # rank structures only: they hold no inverse Fisher for single weights
PRUNING_SHARE_OF_RUN = 0.75  # a recipe without `end_step`: prune over this share of `max_steps`, then recover
PRUNING_STEPS_PER_RUN = 10  # ... in about this many pruning steps
_SCIENTIFIC = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_N_OF_M = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*")


@dataclass
class PruningConfig:
    """The recipe's `pruning:` section: which layers, which pattern, how sparse, and when.

    Args:
        method (`str`, defaults to `'kfac'`):
            Curvature method: kfac | fishleg | magnitude | diagonal_fisher | block_fisher (any registered name).
        targets (`list[str]`, defaults to `[]`):
            Module names or `re:` regexes to prune; empty = every supported layer not ignored.
        ignore (`list[str]`, defaults to `['classifier', 're:.*pooler.*', 'lm_head', 'score']`):
            Module names or `re:` regexes never pruned (task heads by default).
        mask_type (`str`, defaults to `'unstructured'`):
            unstructured, or "N:M" (keep N of every M consecutive weights, e.g. "2:4"), or neurons / heads: remove
            whole FFN neurons / attention heads (grouped-query attention: a KV head with its query heads) of the
            blocks (BERT, Llama, GPT-2 … families: the README's table) with a layer in `targets` (all when empty)
            and none in `ignore` — method kfac: group OBS, magnitude: group norms, taylor: first-order importance;
            the sparsities are then shares of them; neurons+heads removes both in one run, neurons at
            `final_sparsity`, heads at `head_sparsity`.
        head_sparsity (`float | None`, defaults to `None`):
            With `mask_type: neurons+heads`: the share of attention heads removed when the neurons reach
            `final_sparsity` (the same schedule, scaled).
        global_sparsity (`bool`, defaults to `True`):
            Rank saliencies across all targeted layers (true) or within each layer (false); with neurons / heads:
            one threshold over all blocks, or the same share in every block (keeps one width, so the model shrinks).
        init_sparsity (`float`, defaults to `0.0`):
            Sparsity reached at `start_step`, in [0, 1).
        final_sparsity (`float`, defaults to `0.5`):
            Sparsity reached at `end_step`, in [0, 1).
        start_step (`int`, defaults to `0`):
            Optimizer step of the first pruning step.
        end_step (`int | None`, defaults to `None`):
            Optimizer step of the last pruning step; equal to `start_step` means one-shot. Unset: one-shot in
            `oneshot`; in the Trainer, the first 3/4 of the run.
        update_frequency (`int | None`, defaults to `None`):
            Optimizer steps between pruning steps; unset: 1, or about 10 pruning steps when the Trainer sets
            `end_step`.
        inter_func (`str`, defaults to `'cubic'`):
            Sparsity schedule between start and end: cubic | linear.
        recomputations (`int`, defaults to `1`):
            Curvature re-estimates within one pruning step (prune in that many stages).
        min_layer_sparsity (`float`, defaults to `0.0`):
            Lower bound on each layer's sparsity under global ranking.
        max_layer_sparsity (`float`, defaults to `0.99`):
            Upper bound on each layer's sparsity under global ranking.
        compensation (`str`, defaults to `'auto'`):
            Weight update after pruning: auto (obc where the method has a row model, i.e. kfac; block otherwise) |
            obc (exact OBS inside each row with the K-FAC row model; ranks by its own saliency) | block (joint OBS
            within blocks) | independent | none.
        obs_block_size (`int`, defaults to `50`):
            Consecutive weights of a row treated jointly by block compensation.
        obc_rounds (`int`, defaults to `1`):
            With obc compensation: rounds in which a pruning step chooses its weights, each re-ranking the survivors
            by their OBS saliency given the weights pruned so far (same curvature; more rounds: closer to greedy OBC).
        obc_solver (`str`, defaults to `'exact'`):
            With obc compensation: exact (each row's joint OBS optimum, one Cholesky of its kept coordinates per row
            and round; ranks by the mask-aware saliency) | joint (the same joint update, ranked by the saliency of
            the weights as they are, from one eigenbasis per layer: no per-row solve for the ranking) | cg (ranked as
            joint; the update by preconditioned conjugate gradients on every row at once where cheaper than a
            factorisation, to a loss within 1e-3 of the exact update's: 2–5× faster near 50 % sparsity) | sweep
            (SparseGPT's sequential sweep over the columns with one factor per layer, O(cols³ + rows·cols²); ranks as
            joint).
        saliency (`str`, defaults to `'obs'`):
            obs: w²/(2 [Q]_ii), the optimal-brain-surgeon saliency | obd: ½ w² [Q_b⁻¹]_ii, the Fisher diagonal read
            off Q's blocks of obs_block_size (others held fixed).
    """

    method: str = field(
        default="kfac",
        metadata={
            "help": (
                "Curvature method: kfac | fishleg | magnitude | diagonal_fisher | block_fisher (any registered name)."
            )
        },
    )
    targets: list[str] = field(
        default_factory=list,
        metadata={"help": "Module names or `re:` regexes to prune; empty = every supported layer not ignored."},
    )
    ignore: list[str] = field(
        default_factory=lambda: ["classifier", "re:.*pooler.*", "lm_head", "score"],
        metadata={"help": "Module names or `re:` regexes never pruned (task heads by default)."},
    )
    mask_type: str = field(
        default="unstructured",
        metadata={
            "help": 'unstructured, "N:M" (keep N of every M consecutive weights, e.g. "2:4"), or whole structures: '
            "neurons | heads | neurons+heads."
        },
    )
    head_sparsity: float | None = field(
        default=None,
        metadata={
            "help": (
                "With `mask_type: neurons+heads`: the share of attention heads removed when the neurons reach "
                "`final_sparsity` (the same schedule, scaled)."
            )
        },
    )
    global_sparsity: bool = field(
        default=True,
        metadata={"help": "Rank saliencies across all targeted layers (true) or within each layer (false)."},
    )
    init_sparsity: float = field(default=0.0, metadata={"help": "Sparsity reached at `start_step`, in [0, 1)."})
    final_sparsity: float = field(default=0.5, metadata={"help": "Sparsity reached at `end_step`, in [0, 1)."})
    start_step: int = field(default=0, metadata={"help": "Optimizer step of the first pruning step."})
    end_step: int | None = field(
        default=None,
        metadata={
            "help": (
                "Optimizer step of the last pruning step; equal to `start_step` means one-shot. Unset: one-shot in "
                "`oneshot`; in the Trainer, the first 3/4 of the run."
            )
        },
    )
    update_frequency: int | None = field(
        default=None,
        metadata={
            "help": (
                "Optimizer steps between pruning steps; unset: 1, or about 10 pruning steps when the Trainer sets "
                "`end_step`."
            )
        },
    )
    inter_func: str = field(
        default="cubic", metadata={"help": "Sparsity schedule between start and end: cubic | linear."}
    )
    recomputations: int = field(
        default=1, metadata={"help": "Curvature re-estimates within one pruning step (prune in that many stages)."}
    )
    min_layer_sparsity: float = field(
        default=0.0, metadata={"help": "Lower bound on each layer's sparsity under global ranking."}
    )
    max_layer_sparsity: float = field(
        default=0.99, metadata={"help": "Upper bound on each layer's sparsity under global ranking."}
    )
    compensation: str = field(
        default="auto",
        metadata={
            "help": (
                "Weight update after pruning: auto (obc where the method has a row model, i.e. kfac; block "
                "otherwise) | obc (exact OBS inside each row with the K-FAC row model; ranks by its own saliency) | "
                "block (joint OBS within blocks) | independent | none."
            )
        },
    )
    obs_block_size: int = field(
        default=50, metadata={"help": "Consecutive weights of a row treated jointly by block compensation."}
    )
    obc_rounds: int = field(
        default=1,
        metadata={
            "help": (
                "With obc compensation: rounds in which a pruning step chooses its weights, each re-ranking the "
                "survivors by their OBS saliency given the weights pruned so far (same curvature; more rounds: "
                "closer to greedy OBC)."
            )
        },
    )
    obc_solver: str = field(
        default="exact",
        metadata={
            "help": (
                "With obc compensation: exact (each row's joint OBS optimum; a Cholesky of its kept coordinates per "
                "row) | joint (the same update, ranked without per-row solves) | cg (ranked as joint, the update by "
                "conjugate gradients to a loss within 1e-3 of it) | sweep (SparseGPT's column sweep, one "
                "factor per layer: O(cols³ + rows·cols²))."
            )
        },
    )
    saliency: str = field(
        default="obs",
        metadata={
            "help": (
                "obs: w²/(2 [Q]_ii), the optimal-brain-surgeon saliency | obd: ½ w² [Q_b⁻¹]_ii, the Fisher diagonal "
                "read off Q's blocks of obs_block_size (others held fixed)."
            )
        },
    )

    def __post_init__(self) -> None:
        _coerce_fields(self, "pruning")
        for name in ("init_sparsity", "final_sparsity", "min_layer_sparsity", "max_layer_sparsity"):
            self._require(name, 0 <= getattr(self, name) < 1, "is out of range: expected 0 <= value < 1")
        self._require(
            "init_sparsity",
            self.init_sparsity <= self.final_sparsity,
            f"is inconsistent: expected init_sparsity <= `pruning.final_sparsity` (= {self.final_sparsity!r})",
        )
        self._require("start_step", self.start_step >= 0, "is out of range: expected value >= 0")
        self._require(
            "end_step",
            self.end_step is None or self.end_step >= self.start_step,
            f"is inconsistent: expected end_step >= `pruning.start_step` (= {self.start_step!r})",
        )
        if self.end_step is not None and self.update_frequency is None:
            self.update_frequency = 1
        for name in ("update_frequency", "recomputations", "obs_block_size", "obc_rounds"):
            self._require(
                name, getattr(self, name) is None or getattr(self, name) >= 1, "is out of range: expected value >= 1"
            )
        self._require(
            "min_layer_sparsity",
            self.min_layer_sparsity <= self.max_layer_sparsity,
            f"is inconsistent: expected min_layer_sparsity <= `pruning.max_layer_sparsity` (= "
            f"{self.max_layer_sparsity!r})",
        )
        self._require(
            "final_sparsity",
            self.min_layer_sparsity <= self.final_sparsity <= self.max_layer_sparsity,
            f"is inconsistent: expected `pruning.min_layer_sparsity` (= {self.min_layer_sparsity!r}) <= value "
            f"<= `pruning.max_layer_sparsity` (= {self.max_layer_sparsity!r})",
        )
        for name, allowed in (
            ("inter_func", INTER_FUNCS),
            ("compensation", COMPENSATIONS),
            ("saliency", SALIENCIES),
            ("obc_solver", OBC_SOLVERS),
        ):
            self._require(name, getattr(self, name) in allowed, f"is not allowed: expected one of {', '.join(allowed)}")
        self._require("method", bool(self.method), "is empty: expected a registered curvature method")
        n_of_m = parse_mask_type(self.mask_type)
        if _structure_name(self.mask_type) in STRUCTURES:
            self.mask_type = _structure_name(self.mask_type)
            self._require(
                "method",
                self.method in STRUCTURE_METHODS,
                f"is not allowed with `pruning.mask_type: {self.mask_type}`: expected one of "
                f"{', '.join(STRUCTURE_METHODS)}",
            )
        else:
            self.mask_type = "unstructured" if n_of_m is None else f"{n_of_m[0]}:{n_of_m[1]}"
            self._require(
                "method",
                self.method not in STRUCTURE_ONLY_METHODS,
                "ranks structures only: use it with `pruning.mask_type: neurons` or `heads`",
            )
        both = self.mask_type == "neurons+heads"
        self._require(
            "head_sparsity",
            (self.head_sparsity is not None) == both,
            "is required with `pruning.mask_type: neurons+heads` (the heads' share)"
            if both
            else f"applies to `pruning.mask_type: neurons+heads` only, not {self.mask_type!r}",
        )
        if both:
            self._require("head_sparsity", 0 <= self.head_sparsity < 1, "is out of range: expected 0 <= value < 1")
            self._require(
                "final_sparsity",
                self.final_sparsity > 0,
                "must be > 0 with `pruning.mask_type: neurons+heads`: the heads follow its schedule, scaled",
            )
        for name in ("targets", "ignore"):
            for pattern in getattr(self, name):
                self._require(
                    name,
                    _valid_pattern(pattern),
                    f"has {pattern!r}, which is neither a module name nor a valid `re:` regular expression",
                )

    @property
    def structure(self) -> str | None:
        """The structure removed whole (neurons: FFN neurons, heads: attention heads, neurons+heads: both), None for
        single weights."""
        return self.mask_type if self.mask_type in STRUCTURES else None

    @property
    def structure_kinds(self) -> tuple[str, ...]:
        """The kinds of structure removed: ("neurons",), ("heads",), ("neurons", "heads"); () for single weights."""
        return tuple(self.structure.split("+")) if self.structure else ()

    def structure_share(self, kind: str, share: float) -> float:
        """The share of `kind` removed when the schedule asks for `share`: `share` itself, or for heads beside
        neurons the same fraction of the way to `head_sparsity`."""
        if kind == "heads" and self.structure == "neurons+heads":
            return share * self.head_sparsity / self.final_sparsity
        return share

    @property
    def n_of_m(self) -> tuple[int, int] | None:
        """(N, M) for an "N:M" mask (N weights kept per M consecutive), None when unstructured."""
        return parse_mask_type(self.mask_type)

    @property
    def last_step(self) -> int:
        """`end_step`, or `start_step` when unset (one-shot)."""
        return self.start_step if self.end_step is None else self.end_step

    @property
    def one_shot(self) -> bool:
        """True when all pruning happens at a single step (`end_step` unset or equal to `start_step`)."""
        return self.last_step == self.start_step

    def _require(self, name: str, ok: bool, problem: str) -> None:
        if not ok:
            raise RecipeError(f"recipe key `pruning.{name}` = {getattr(self, name)!r} {problem}")


@dataclass
class PruningRecipe:
    """A whole recipe: `pruning` settings plus the curvature settings of `pruning.method`.

    `curvature` must be an instance of exactly `config_class_for(pruning.method)`; None (the default)
    means that class's defaults.

    Example:
        >>> recipe = PruningRecipe(PruningConfig(method="magnitude", final_sparsity=0.7))
        >>> recipe.curvature.damping
        0.001
    """

    pruning: PruningConfig = field(
        default_factory=PruningConfig, metadata={"help": "What to prune, how much and when."}
    )
    curvature: CurvatureConfig = field(
        default=None, metadata={"help": "Settings of the method's curvature estimate; None = its defaults."}
    )  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.pruning, PruningConfig):
            raise RecipeError(f"recipe section `pruning` must be a PruningConfig, got {type(self.pruning).__name__}")
        config_class = config_class_for(self.pruning.method)
        if self.curvature is None:
            self.curvature = _build_section(config_class, {}, "curvature")
        elif type(self.curvature) is not config_class:
            raise RecipeError(
                f"recipe section `curvature` is a {type(self.curvature).__name__}, but `pruning.method` = "
                f"{self.pruning.method!r} expects a {config_class.__name__}"
            )
        if getattr(self.curvature, "first_order", False) and self.pruning.structure is None:
            raise RecipeError(
                "recipe key `curvature.first_order` = True adds a term to the cost of whole structures: use it with "
                f"`pruning.mask_type: neurons` or `heads` (got {self.pruning.mask_type!r})"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> PruningRecipe:
        """Build from `{"pruning": {...}, "curvature": {...}}`, applying dotted `overrides` first.

        Example:
            >>> recipe = PruningRecipe.from_dict({"pruning": {"method": "magnitude"}}, {"curvature.damping": "1e-2"})
            >>> recipe.curvature.damping
            0.01
        """
        data = _apply_overrides(_as_mapping(data, "a recipe"), overrides or {})
        _check_keys(data, SECTIONS, "", _section_keys())
        pruning = _build_section(PruningConfig, data.get("pruning"), "pruning")
        curvature = _build_section(config_class_for(pruning.method), data.get("curvature"), "curvature")
        return cls(pruning, curvature)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of every key (defaults included); `from_dict` inverts it."""
        return {"pruning": asdict(self.pruning), "curvature": asdict(self.curvature)}

    def to_yaml(self) -> str:
        """YAML text that `load_recipe` reads back to an equal recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write `to_yaml()` to `path` (parent folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path


def load_recipe(
    source: PruningRecipe | Mapping[str, Any] | str | Path, overrides: Mapping[str, Any] | None = None
) -> PruningRecipe:
    """Read a recipe from a recipe (copied), a dict, a YAML file path or a YAML string.

    `overrides` maps dotted keys to values and is applied before validation.

    Raises:
        RecipeError: malformed YAML, a missing file, or a key that is unknown, mistyped, out of range
            or inconsistent (the message names the dotted key and what is allowed).

    Example:
        >>> recipe = load_recipe("pruning: {method: magnitude, final_sparsity: 0.9}", {"pruning.final_sparsity": 0.8})
        >>> recipe.pruning.final_sparsity
        0.8
    """
    if isinstance(source, PruningRecipe):
        data: Any = source.to_dict()
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    elif isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    elif isinstance(source, str):
        data = _parse_yaml(source, "string")
    else:
        raise RecipeError(
            f"recipe source must be a PruningRecipe, dict, path or YAML string, got {type(source).__name__}"
        )
    return PruningRecipe.from_dict(data, overrides)


def _structure_name(value: str) -> str:
    """A mask_type in its one spelling: stripped, lower case, with both kinds as `neurons+heads` (either order)."""
    parts = {part.strip() for part in value.lower().split("+")}
    if parts <= set(STRUCTURE_KINDS):
        return "+".join(kind for kind in STRUCTURE_KINDS if kind in parts)
    return value.strip().lower()


def parse_mask_type(value: Any) -> tuple[int, int] | None:
    """The one N:M grammar: `"unstructured"` → None, `"N:M"` (integers, 1 <= N < M, spaces allowed) → (N, M).

    Raises:
        RecipeError: anything else, naming `pruning.mask_type` (an int gets the YAML base-60 hint).
    """
    if not isinstance(value, str):
        # YAML 1.1 (PyYAML) reads an unquoted N:M as a base-60 integer: 2:4 → 124, 4:8 → 248
        hint = ' (YAML reads an unquoted 2:4 as the number 124: quote it, "2:4")' if isinstance(value, int) else ""
        raise RecipeError(
            f"recipe key `pruning.mask_type` = {value!r} must be a string{hint}; allowed: unstructured, "
            '"N:M", neurons, heads, neurons+heads'
        )
    if value.strip().lower() == "unstructured" or _structure_name(value) in STRUCTURES:  # no N:M pattern there
        return None
    match = _N_OF_M.fullmatch(value)
    if match is None:
        raise RecipeError(
            f"recipe key `pruning.mask_type` = {value!r} is not understood; allowed: unstructured, "
            '"N:M" such as "2:4", neurons, heads, neurons+heads'
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise RecipeError(f"recipe key `pruning.mask_type` = {value!r} needs 1 <= N < M (N survivors per group of M)")
    return n, m


def schedule_over_run(recipe: PruningRecipe, max_steps: int) -> PruningRecipe:
    """The recipe a training run of `max_steps` optimizer steps follows; unchanged when it sets `end_step`.

    Without `end_step`, pruning runs from `start_step` over `PRUNING_SHARE_OF_RUN` of the remaining steps in
    about `PRUNING_STEPS_PER_RUN` pruning steps (unless `update_frequency` is set), then the model recovers.
    Logged once, so the run says what schedule it follows.
    """
    cfg = recipe.pruning
    if cfg.end_step is not None:
        return recipe
    span = max(0, math.floor(PRUNING_SHARE_OF_RUN * (max_steps - cfg.start_step)))
    frequency = cfg.update_frequency or max(1, span // PRUNING_STEPS_PER_RUN)
    pruning = replace(cfg, end_step=cfg.start_step + span, update_frequency=frequency)
    log_main(
        "fls_hf: the recipe sets no `pruning.end_step`: pruning %.0f %% → %.0f %% from step %d to %d, every %d steps "
        "(of %d; the rest is for recovery)",
        100 * cfg.init_sparsity,
        100 * cfg.final_sparsity,
        pruning.start_step,
        pruning.end_step,
        frequency,
        max_steps,
    )
    return PruningRecipe(pruning, recipe.curvature)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn command-line `key=value` items into an overrides dict, values parsed as YAML.

    Example:
        >>> parse_overrides(["pruning.final_sparsity=0.8", "pruning.mask_type=2:4", "curvature.damping=1e-4"])
        {'pruning.final_sparsity': 0.8, 'pruning.mask_type': '2:4', 'curvature.damping': 0.0001}
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"override {item!r} must look like `section.key=value`, e.g. `pruning.final_sparsity=0.8`"
            )
        value = _parse_yaml(text, f"override {item!r}")
        if ":" in text and isinstance(value, (int, float)):  # YAML 1.1 reads unquoted 2:4 as the base-60 integer 124
            value = text.strip()
        elif isinstance(value, str) and _SCIENTIFIC.fullmatch(value):  # YAML 1.1 wants a dot: 1e-4 stays a string
            value = float(value)
        overrides[key.strip()] = value
    return overrides


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:  # e.g. `!!python/object/apply:os.system`
        raise RecipeError(
            f"recipe {origin} uses a YAML tag that is not plain data ({error.problem}); recipes are read with "
            "yaml.safe_load and never construct Python objects or run code"
        ) from error
    except yaml.YAMLError as error:
        where = str(error).replace('"<unicode string>"', origin)
        raise RecipeError(f"recipe {origin} is not valid YAML: {where}") from error


def _looks_like_path(text: str) -> bool:
    if "\n" in text:
        return False
    try:
        return text.endswith((".yaml", ".yml")) or Path(text).is_file()
    except OSError:
        return False


def _as_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where} must be a mapping of keys to values, got {type(value).__name__} {value!r:.80}")
    return {str(key): item for key, item in value.items()}


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key or "." in key:
            known = [f"{home}.{name}" for home, names in _section_keys().items() for name in names]
            guess = _closest(dotted, known)
            raise RecipeError(f"override key `{dotted}` must look like `section.key`{guess}")
        if section not in SECTIONS:
            raise RecipeError(f"override key `{dotted}` is unknown{_closest(section, SECTIONS, suffix='.' + key)}")
        data[section] = _as_mapping(data.get(section), f"recipe section `{section}`")
        data[section][key] = value
    return data


def _build_section(cls: type, raw: Any, section: str) -> Any:
    """Check keys and types of one section, then construct `cls` (its `__post_init__` checks ranges)."""
    values = _as_mapping(raw, f"recipe section `{section}`")
    hints = get_type_hints(cls)
    elsewhere = {other: names for other, names in _section_keys().items() if other != section}
    _check_keys(values, _names(cls), f"{section}.", elsewhere, cls)
    kwargs = {key: _coerce(f"{section}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except CurvatureError as error:
        raise RecipeError(str(error)) from error


def _check_keys(
    values: Mapping[str, Any],
    valid: Sequence[str],
    prefix: str,
    elsewhere: Mapping[str, Sequence[str]],
    cls: type | None = None,
) -> None:
    for key in values:
        if key in valid:
            continue
        home = next((f"{other}.{key}" for other, names in elsewhere.items() if key in names), None)
        hint = f" (did you mean `{home}`?)" if home else _closest(key, valid, prefix)
        owner = f" of {cls.__name__}" if cls is not None else ""
        raise RecipeError(f"recipe key `{prefix}{key}` is unknown{hint or f'; valid keys{owner}: ' + ', '.join(valid)}")


def _closest(word: str, choices: Sequence[str], prefix: str = "", suffix: str = "") -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{prefix}{match[0]}{suffix}`?)" if match else ""


def _section_keys() -> dict[str, list[str]]:
    """Keys every recipe may hold per section (method-specific curvature keys come on top)."""
    return {"pruning": _names(PruningConfig), "curvature": _names(CurvatureConfig)}


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


def _coerce_fields(config: Any, section: str) -> None:
    hints = get_type_hints(type(config))
    for name in _names(type(config)):
        setattr(config, name, _coerce(f"{section}.{name}", getattr(config, name), hints[name]))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` as the annotated type: ints are not bools, floats accept ints and numeric strings."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except RecipeError:
                pass
    elif origin is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return [_coerce(f"{key}[{i}]", item, args[0] if args else Any) for i, item in enumerate(items)]
    elif origin is Literal:
        if value in args:
            return value
    elif hint is Any:
        return value
    elif hint is float:
        if not isinstance(value, bool) and isinstance(value, (int, float, str)):
            try:
                return float(value)
            except (ValueError, OverflowError):
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    sexagesimal = key == "pruning.mask_type" and type(value) is int
    note = " (quote it: YAML reads an unquoted 2:4 as the base-60 integer 124)" if sexagesimal else ""
    raise RecipeError(f"recipe key `{key}` = {value!r} has the wrong type: expected {_type_name(hint)}{note}")


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and not get_args(hint) else str(hint).replace("typing.", "")


def _valid_pattern(pattern: str) -> bool:
    if not pattern.startswith("re:"):
        return bool(pattern)
    try:
        re.compile(pattern[3:])
    except re.error:
        return False
    return True

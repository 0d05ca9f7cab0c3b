"""Recipe `curvature:` sections: the settings every method shares and those of the Fisher baselines.

Each method's config is a dataclass validated in `__post_init__` (PEFT's pattern); `recipe.py` checks key
names and types against these fields, and `register_curvature` ties a config class to its `pruning.method`.
FishLeg's config lives beside its provider (`fishleg/config.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import CurvatureError
from ..fisher.gradients import FISHER_LABELS
from ..fisher.likelihoods import LIKELIHOODS

DAMPING_MODES = ("relative", "absolute")
STATISTICS_SOURCES = ("pass", "training")  # kfac: where Ā and G come from
FULL_G_ROWS = 4096  # kfac: widest layer keeping the full G where the rule reads Q's coupling across rows


@dataclass
class CurvatureConfig:
    """Settings shared by every curvature method (the recipe's `curvature:` section).

    Args:
        damping (`float`, defaults to `0.001`):
            γ in Q ≈ (F + γI)⁻¹; moves OBS (small) towards magnitude (large).
        num_batches (`int`, defaults to `16`):
            Calibration batches used to estimate curvature before pruning.
        likelihood (`str`, defaults to `'auto'`):
            auto | categorical | gaussian | bernoulli (output distribution for the true Fisher).
        max_memory_gib (`float | None`, defaults to `None`):
            Refuse to allocate curvature state above this many GiB.
        seed (`int`, defaults to `0`):
            Seed of the curvature's random draws (sampled labels, FishLeg's u), identical on every rank.
    """

    damping: float = field(
        default=1e-3, metadata={"help": "γ in Q ≈ (F + γI)⁻¹; moves OBS (small) towards magnitude (large)."}
    )
    num_batches: int = field(
        default=16, metadata={"help": "Calibration batches used to estimate curvature before pruning."}
    )
    likelihood: str = field(
        default="auto",
        metadata={"help": "auto | categorical | gaussian | bernoulli (output distribution for the true Fisher)."},
    )
    max_memory_gib: float | None = field(
        default=None, metadata={"help": "Refuse to allocate curvature state above this many GiB."}
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the curvature's random draws (sampled labels, FishLeg's u), identical on every rank."
        },
    )

    def __post_init__(self) -> None:
        if not self.damping > 0:
            raise CurvatureError(f"recipe key `curvature.damping` = {self.damping!r} must be > 0")
        if self.num_batches < 1:
            raise CurvatureError(f"recipe key `curvature.num_batches` = {self.num_batches!r} must be >= 1")
        allowed = ("auto", *LIKELIHOODS)
        if self.likelihood not in allowed:
            raise CurvatureError(
                f"recipe key `curvature.likelihood` = {self.likelihood!r}; allowed: {', '.join(allowed)}"
            )

    def for_rule(self, compensation: str) -> CurvatureConfig:
        """The settings a provider is built with once the Pruner has resolved `pruning.compensation` (settings left
        to the rule, e.g. kfac's `max_full_g_rows`, resolved; the recipe keeps what the user wrote)."""
        return self


@dataclass
class GradientFisherConfig(CurvatureConfig):
    """Settings shared by the Fisher estimates built from per-example gradients (diagonal, block).

    Args:
        num_grads (`int`, defaults to `256`):
            Examples (per-example gradients) per estimate; bounds time, not memory. Replaces num_batches.
        fisher_labels (`str`, defaults to `'empirical'`):
            empirical (data labels, as oBERT) | sampled (labels drawn from the model: true Fisher) | expected (exact
            true Fisher, one pass per class; classification only; num_grads counts examples × classes).
    """

    num_grads: int = field(
        default=256,
        metadata={
            "help": "Examples (per-example gradients) per estimate; bounds time, not memory. Replaces num_batches."
        },
    )
    fisher_labels: str = field(
        default="empirical",
        metadata={
            "help": (
                "empirical (data labels, as oBERT) | sampled (labels drawn from the model: true Fisher) | expected "
                "(exact true Fisher, one pass per class; classification only; num_grads counts examples × classes)."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_grads < 1:
            raise CurvatureError(f"recipe key `curvature.num_grads` = {self.num_grads!r} must be >= 1")
        if self.fisher_labels not in FISHER_LABELS:
            raise CurvatureError(
                f"recipe key `curvature.fisher_labels` = {self.fisher_labels!r}; allowed: {', '.join(FISHER_LABELS)}"
            )


@dataclass
class DiagonalFisherConfig(GradientFisherConfig):
    """The `curvature:` section for `method: diagonal_fisher` (`num_grads`, `fisher_labels`, `seed`)."""


@dataclass
class BlockFisherConfig(GradientFisherConfig):
    """The `curvature:` section for `method: block_fisher`.

    Args:
        block_size (`int`, defaults to `50`):
            B: consecutive weights of a row per Fisher block (oBERT: 50). Memory: 4·B bytes per weight.
    """

    block_size: int = field(
        default=50,
        metadata={
            "help": "B: consecutive weights of a row per Fisher block (oBERT: 50). Memory: 4·B bytes per weight."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise CurvatureError(f"recipe key `curvature.block_size` = {self.block_size!r} must be >= 1")


@dataclass
class KFACConfig(CurvatureConfig):
    """The `curvature:` section for `method: kfac`.

    Args:
        damping (`float`, defaults to `0.01`):
            γ in Q ≈ (F + γI)⁻¹. With `damping_mode: relative` a multiple of the mean diagonal of the K-FAC Fisher
            over the targeted layers (re-taken with the statistics), so one value serves models whose Fisher scales
            differ by orders of magnitude (measured: 1e-2 near the best validation choice on MiniLM and a causal LM).
        damping_mode (`str`, defaults to `'relative'`):
            relative: γ = damping · mean_l,i,j(G_ii Ā_jj) | absolute: γ = damping, in the loss's units.
        num_examples (`int`, defaults to `256`):
            Examples (labels sampled from the model) per K-FAC estimate, taken afresh before each pruning step.
        max_full_g_rows (`int | None`, defaults to `None`):
            Layers with at most this many rows keep the full output-side factor G (rows² floats); wider ones keep
            diag G (warned). None: 0 under `pruning.compensation: obc` (its row model reads only diag G), 4096 for
            the rules that use Q's coupling across rows (block / independent compensation, OBD saliency) and for
            structures (group OBS's cost reads the full G of each consumer).
        fisher_labels (`str`, defaults to `'sampled'`):
            sampled (labels drawn from the model: true Fisher) | empirical (the batches' labels, as oBERT).
        statistics (`str`, defaults to `'pass'`):
            pass: a statistics pass over `num_examples` calibration examples before each pruning step | training
            (in the Trainer): Ā and G from the training steps just before each pruning step — their forward and the
            training loss's backward, so no extra pass; G is then the training loss's empirical Fisher and
            `fisher_labels` is not read. Needs `damping_mode: relative` (the training loss's normalisation sets G's
            scale). A pruning step closer than the window to the previous one is served by every step since then
            when those are at least half the window; pruning steps with fewer (the first) take a pass.
        first_order (`bool`, defaults to `False`):
            Structures (`pruning.mask_type: neurons | heads`): add the first-order term g·δW of the mean data-label
            gradient g to each group's OBS cost, so a group the loss is pushing towards zero goes first. Costs a
            pass over `num_examples` labelled calibration examples before each pruning step and one float32 copy
            of the targeted weights; needs `statistics: pass`. Measured on MiniLM (benchmarks/README.md,
            "Structured"): with 256 examples the term is hundreds of times the quadratic cost and mostly sampling
            noise, and a gradual run lost 11.7 points; off unless you can afford many more examples.
    """

    damping: float = field(
        default=1e-2,
        metadata={
            "help": (
                "γ in Q ≈ (F + γI)⁻¹; with damping_mode relative a multiple of the mean K-FAC Fisher diagonal over "
                "the targeted layers."
            )
        },
    )
    damping_mode: str = field(
        default="relative",
        metadata={
            "help": "relative: γ = damping · mean_l,i,j(G_ii Ā_jj) | absolute: γ = damping, in the loss's units."
        },
    )
    num_examples: int = field(
        default=256,
        metadata={
            "help": "Examples (labels sampled from the model) per K-FAC estimate, taken before each pruning step."
        },
    )
    max_full_g_rows: int | None = field(
        default=None,
        metadata={
            "help": (
                "Layers with at most this many rows keep the full G (rows² floats); wider ones keep diag G. None: 0 "
                "under compensation obc (its row model reads diag G only), else 4096 (structures included)."
            )
        },
    )
    fisher_labels: str = field(
        default="sampled",
        metadata={
            "help": "sampled (labels drawn from the model: true Fisher) | empirical (the batches' labels, as oBERT)."
        },
    )

    statistics: str = field(
        default="pass",
        metadata={
            "help": (
                "pass: a statistics pass before each pruning step | training: Ā and G from the training steps just "
                "before it (Trainer only; empirical Fisher; needs damping_mode relative)."
            )
        },
    )

    first_order: bool = field(
        default=False,
        metadata={
            "help": (
                "Structures: add the mean data-label gradient's first-order term g·δW to each group's OBS cost (a "
                "labelled pass before each pruning step; needs statistics pass)."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.statistics not in STATISTICS_SOURCES:
            raise CurvatureError(
                f"recipe key `curvature.statistics` = {self.statistics!r}; allowed: {', '.join(STATISTICS_SOURCES)}"
            )
        if self.statistics == "training" and self.damping_mode != "relative":
            raise CurvatureError(
                "recipe key `curvature.statistics` = 'training' needs `curvature.damping_mode: relative` (the "
                f"training loss's normalisation sets G's scale); got damping_mode = {self.damping_mode!r}"
            )
        if self.first_order and self.statistics != "pass":
            raise CurvatureError(
                "recipe key `curvature.first_order` = True needs `curvature.statistics: pass` (its gradient comes from "
                f"a labelled calibration pass); got statistics = {self.statistics!r}"
            )
        if self.num_examples < 1:
            raise CurvatureError(f"recipe key `curvature.num_examples` = {self.num_examples!r} must be >= 1")
        if self.max_full_g_rows is not None and self.max_full_g_rows < 0:
            raise CurvatureError(
                f"recipe key `curvature.max_full_g_rows` = {self.max_full_g_rows!r} must be >= 0 (0: diag G everywhere)"
            )
        if self.damping_mode not in DAMPING_MODES:
            raise CurvatureError(
                f"recipe key `curvature.damping_mode` = {self.damping_mode!r}; allowed: {', '.join(DAMPING_MODES)}"
            )
        if self.fisher_labels not in ("sampled", "empirical"):
            raise CurvatureError(
                f"recipe key `curvature.fisher_labels` = {self.fisher_labels!r}; allowed for `kfac`: sampled, empirical"
            )

    def for_rule(self, compensation: str) -> KFACConfig:
        if self.max_full_g_rows is not None:
            return self
        return replace(self, max_full_g_rows=0 if compensation == "obc" else FULL_G_ROWS)

"""The `curvature:` section of a recipe with `pruning.method: fishleg`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import CurvatureError
from ...fisher.products import FISHER_PRODUCTS
from ..base import CurvatureConfig
from .structures import STRUCTURES


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CurvatureError(f"recipe key `curvature.{key}` = {value!r}; allowed: {', '.join(allowed)}")


@dataclass
class FishLegConfig(CurvatureConfig):
    """The `curvature:` section for `method: fishleg`.

    Args:
        structure (`str`, defaults to `'diagonal'`):
            Q structure per layer: block_diagonal | kronecker | diagonal
        block_size (`int`, defaults to `32`):
            block_diagonal: consecutive weights of a row per block.
        factor_block_size (`int | None`, defaults to `None`):
            kronecker: make R and L block-diagonal with blocks this size (bounds memory for wide layers).
        init (`str`, defaults to `'kfac'`):
            identity (Q = I/γ, ≡ magnitude) | diagonal (Q = diag 1/(E[g²]+γ), ≡ OBD) | kfac (Q from the K-FAC Fisher
            G ⊗ Ā) | fisher (block_diagonal / diagonal: the structure's blocks of (E[g gᵀ] + γI)⁻¹ from per-example
            gradients, ≡ oBERT's inverse from the true Fisher).
        init_examples (`int`, defaults to `256`):
            Examples (sampled labels) for the diagonal or K-FAC warm start; gradient vectors (examples × classes
            with init_labels: expected) for init: fisher.
        init_labels (`str`, defaults to `'sampled'`):
            init: diagonal / fisher: sampled (labels drawn from the model) | expected (exact true Fisher, one pass
            per class; classification only).
        aux_lr (`float`, defaults to `0.01`):
            Adam learning rate of the auxiliary loss.
        aux_lr_schedule (`str`, defaults to `'constant'`):
            constant | linear (decays to 0.1 × aux_lr over warmup_steps).
        warmup_steps (`int`, defaults to `100`):
            Aux steps before the first pruning step.
        refinement_steps (`int`, defaults to `10`):
            Aux steps run before each later pruning step (refinement, not re-estimation).
        rewarm (`bool`, defaults to `True`):
            Before every later pruning step, restart Q from a fresh warm start (`init`) on the current weights, then
            take the refinement_steps aux steps (tracks a Fisher that pruning changes a lot, e.g. under BatchNorm);
            false: only refine the previous Q.
        refine_every (`int`, defaults to `0`):
            During training, also run one aux step every N optimizer steps (0 = off).
        fisher_product (`str`, defaults to `'ggn'`):
            ggn (exact Gauss-Newton, default) | hvp (sampled-label Hessian-vector product).
        u_sampling (`str`, defaults to `'gaussian'`):
            gaussian (all coordinate directions, for pruning) | gradient (sampled-label gradient direction).
        precondition_aux (`bool`, defaults to `False`):
            Replace r by Q·r in the aux gradient (Newton-like; can diverge at large aux_lr).
    """

    # Defaults chosen by benchmarks/README.md (one-shot MiniLM): the K-FAC start wins by 5-28 points over the
    # identity / OBD starts at 70-80 %; diagonal and block_diagonal Q tie within noise, diagonal at 1/30 the memory.
    structure: str = field(default="diagonal", metadata={"help": "Q structure per layer: " + " | ".join(STRUCTURES)})
    block_size: int = field(default=32, metadata={"help": "block_diagonal: consecutive weights of a row per block."})
    factor_block_size: int | None = field(
        default=None,
        metadata={
            "help": "kronecker: make R and L block-diagonal with blocks this size (bounds memory for wide layers)."
        },
    )
    init: str = field(
        default="kfac",
        metadata={
            "help": (
                "identity (Q = I/γ, ≡ magnitude) | diagonal (Q = diag 1/(E[g²]+γ), ≡ OBD) | kfac (Q from the K-FAC "
                "Fisher G ⊗ Ā) | fisher (block_diagonal / diagonal: the structure's blocks of (E[g gᵀ] + γI)⁻¹ from "
                "per-example gradients, ≡ oBERT's inverse from the true Fisher)."
            )
        },
    )
    init_examples: int = field(
        default=256,
        metadata={
            "help": (
                "Examples (sampled labels) for the diagonal or K-FAC warm start; gradient vectors (examples × classes "
                "with init_labels: expected) for init: fisher."
            )
        },
    )
    init_labels: str = field(
        default="sampled",
        metadata={
            "help": (
                "init: diagonal / fisher: sampled (labels drawn from the model) | expected (exact true Fisher, one "
                "pass per class; classification only)."
            )
        },
    )
    aux_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the auxiliary loss."})
    aux_lr_schedule: str = field(
        default="constant", metadata={"help": "constant | linear (decays to 0.1 × aux_lr over warmup_steps)."}
    )
    warmup_steps: int = field(default=100, metadata={"help": "Aux steps before the first pruning step."})
    refinement_steps: int = field(
        default=10, metadata={"help": "Aux steps run before each later pruning step (refinement, not re-estimation)."}
    )
    # rewarm on by default (benchmarks/README.md, B1 / B3 b): without it Q barely leaves its dense-model start
    # (a small ResNet fell to 68 % at 95 %, 87.6 % with it; MiniLM 90 %: +0.6 validation, +1.3 test).
    rewarm: bool = field(
        default=True,
        metadata={
            "help": (
                "Before every later pruning step, restart Q from a fresh warm start (`init`) on the current weights, "
                "then take the refinement_steps aux steps (tracks a Fisher that pruning changes a lot, e.g. under "
                "BatchNorm); false: only refine the previous Q."
            )
        },
    )
    refine_every: int = field(
        default=0, metadata={"help": "During training, also run one aux step every N optimizer steps (0 = off)."}
    )
    fisher_product: str = field(
        default="ggn",
        metadata={"help": "ggn (exact Gauss-Newton, default) | hvp (sampled-label Hessian-vector product)."},
    )
    u_sampling: str = field(
        default="gaussian",
        metadata={
            "help": "gaussian (all coordinate directions, for pruning) | gradient (sampled-label gradient direction)."
        },
    )
    precondition_aux: bool = field(
        default=False,
        metadata={"help": "Replace r by Q·r in the aux gradient (Newton-like; can diverge at large aux_lr)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("structure", self.structure, STRUCTURES)
        _check_choice("init", self.init, ("identity", "diagonal", "kfac", "fisher"))
        _check_choice("init_labels", self.init_labels, ("sampled", "expected"))
        if self.init == "fisher" and self.structure == "kronecker":
            raise CurvatureError(
                "recipe key `curvature.init` = 'fisher' needs `curvature.structure` block_diagonal or diagonal; "
                "kronecker takes 'kfac'"
            )
        _check_choice("aux_lr_schedule", self.aux_lr_schedule, ("constant", "linear"))
        _check_choice("fisher_product", self.fisher_product, tuple(FISHER_PRODUCTS))
        _check_choice("u_sampling", self.u_sampling, ("gaussian", "gradient"))
        for key in ("block_size", "init_examples"):
            if getattr(self, key) < 1:
                raise CurvatureError(f"recipe key `curvature.{key}` = {getattr(self, key)!r} must be >= 1")
        for key in ("warmup_steps", "refinement_steps", "refine_every"):
            if getattr(self, key) < 0:
                raise CurvatureError(f"recipe key `curvature.{key}` = {getattr(self, key)!r} must be >= 0")
        if self.factor_block_size is not None and self.factor_block_size < 1:
            raise CurvatureError(
                f"recipe key `curvature.factor_block_size` = {self.factor_block_size!r} must be >= 1 or null"
            )
        if not self.aux_lr > 0:
            raise CurvatureError(f"recipe key `curvature.aux_lr` = {self.aux_lr!r} must be > 0")

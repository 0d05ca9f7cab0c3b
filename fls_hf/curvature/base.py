"""The curvature-provider interface every inverse-Fisher estimate implements, and its registry.

A provider holds, for each prunable layer (keyed by module name), an estimate Q ≈ (F + γI)⁻¹ of the
damped inverse Fisher restricted to that layer's weights. The Pruner drives it with two verbs:

- `ready(model, batches)`: bring Q up to date for a pruning step on the model as it is now (each provider
  decides how from its own config: re-estimate, warm up, re-warm, refine);
- `on_optimizer_step(model, batches, step)`: after a training step that did not prune (default: nothing);

the surgeon reads it through `diag(name)`, `matvec(name, V)`, `blocks(name, B)` and `row_model(name)`, and
restricts it to the surviving weights with `mask(name, keep)`. State: `state_dict()` / `load_state_dict()`; memory:
`estimated_bytes()` (before allocating) and `memory_bytes()`.

The magnitude provider (Q = I/γ) is the simplest implementation and doubles as the test double.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..distributed import ShardCounts, rank_seed
from ..errors import CurvatureError, RecipeError
from ..fisher.likelihoods import Likelihood, likelihood_for
from ..fisher.training import TrainingStatistics
from ..model.adapters import LayerAdapter
from ..model.blocks import row_blocks
from ..model.forward import unwrap
from ..progress import log_main, warn_main
from .config import CurvatureConfig

Batches = Iterable[Mapping[str, Any]]


@dataclass(frozen=True)
class RowModel:
    """A layer's row-wise curvature: row i has Hessian S_i⁻¹ (G_ii Ā + γI) S_i⁻¹, with Ā = U diag(λ) Uᵀ shared by the
    rows and S_i = diag(column_scale_i) (the identity for K-FAC; a learned Kronecker Q's elementwise scale A).

    Args:
        basis: U, (cols, cols) float64, orthonormal eigenvectors of Ā (the input-side K-FAC factor).
        eigenvalues: λ, (cols,) float64, non-negative.
        row_weight: G_ii, (rows,) float64, non-negative (the output-side Fisher of each row).
        damping: γ ≥ 0; 0 only when Ā is positive definite (a learned Q's factors hold their damping).
        column_scale: S, (rows, cols) float64, positive; None: all ones.
        row_weight_mean: mean G_ii over every row of the layer, where `row_weight` holds only some (an FSDP2
            shard's); None: the mean of `row_weight`.
        matrix: Ā itself, where the provider holds it (any float dtype; its eigendecomposition is basis and
            eigenvalues): `a_bar()` reads it instead of forming U diag(λ) Uᵀ, a cols³ product per call. None: formed.
        input_mean: μ = E[a], (cols,): the Kronecker factor's ones column (the bias's input), where the provider holds
            it (K-FAC); group OBS eliminates a free bias with it (`pruning/structured.py`). None: not held.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    row_weight: torch.Tensor
    damping: float
    column_scale: torch.Tensor | None = None
    row_weight_mean: float | None = None
    matrix: torch.Tensor | None = None
    input_mean: torch.Tensor | None = None

    def mean_row_weight(self) -> float:
        """Mean G_ii over the layer's rows (all shards)."""
        return float(self.row_weight.mean()) if self.row_weight_mean is None else self.row_weight_mean

    def spectrum(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """1 / (G_ii λ_b + γ) for the given rows: (rows, cols), eigenvalues of (G_ii Ā + γI)⁻¹ (H_i⁻¹ if S = I)."""
        return 1.0 / (self.row_weight[rows, None] * self.eigenvalues[None, :] + self.damping)

    def a_bar(self) -> torch.Tensor:
        """Ā = U diag(λ) Uᵀ: (cols, cols) float64."""
        if self.matrix is not None:
            return self.matrix.double()
        return (self.basis * self.eigenvalues) @ self.basis.T

    def unscaled(self) -> RowModel:
        """The same model with S = I (the row problem in the coordinates W ⊘ S, where every row shares Ā)."""
        return replace(self, column_scale=None)

    def inverse_diag(self) -> torch.Tensor:
        """[H_i⁻¹]_jj for every (i, j): (rows, cols)."""
        diagonal = self.spectrum() @ self.basis.square().T
        return diagonal if self.column_scale is None else diagonal * self.column_scale.square()


class CurvatureProvider(ABC):
    """An inverse-Fisher estimate Q ≈ (F + γI)⁻¹, block-diagonal over the prunable layers.

    Args:
        layers: module name → adapter, for every layer the provider covers.
        config: the method's `CurvatureConfig` subclass.
        likelihood: output distribution of the true Fisher; None resolves `config.likelihood` against the
            model at the first pass (`likelihood_of`).
    """

    config_class: type[CurvatureConfig] = CurvatureConfig

    def __init__(
        self, layers: Mapping[str, LayerAdapter], config: CurvatureConfig, likelihood: Likelihood | None = None
    ) -> None:
        self.layers = dict(layers)
        self.config = config
        self.keep: dict[str, torch.Tensor] = {}
        self.likelihood = likelihood
        self.shards: ShardCounts | None = None  # FSDP2 (set by the Pruner): layers hold this rank's rows
        self._generator: torch.Generator | None = None
        self._saved_rng: torch.Tensor | None = None  # a loaded RNG state, applied when the generator is made

    @property
    def generator(self) -> torch.Generator:
        """The RNG of sampled labels and FishLeg's u, on the layers' device: draws happen where the tensors live
        (no host draws or copies on a GPU). Seeded from `curvature.seed` and the data-parallel rank (ranks draw
        their own labels and u and all-reduce what they estimate); one process on a CPU draws what it always drew."""
        device = self.device(next(iter(self.layers))) if self.layers else torch.device("cpu")
        if self._generator is None or self._generator.device != device:
            self._generator = device_generator(device, rank_seed(self.config.seed))
            if self._saved_rng is not None:
                restore_rng(self._generator, self._saved_rng)
                self._saved_rng = None
        return self._generator

    @property
    def damping(self) -> float:
        return self.config.damping

    # ----------------------------------------------------------------- what the Pruner drives
    def ready(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """Bring Q up to date for a pruning step on `model` as it is now; returns diagnostics (default: Q fixed)."""
        return {}

    def on_optimizer_step(self, model: nn.Module, batches: Batches, step: int) -> dict[str, float]:
        """After optimizer step `step` when nothing was pruned; learned providers may refine (default: nothing)."""
        return {}

    def training_statistics(self) -> TrainingStatistics | None:
        """A collector of the statistics `ready` needs from the training steps themselves (`curvature.statistics:
        training`), which the Trainer callback feeds; None (the default): `ready` always takes a pass."""
        return None

    def ready_from_training(self, stats: TrainingStatistics) -> dict[str, float] | None:
        """`ready` from a completed collection window of `training_statistics()` instead of a pass; None when the
        window cannot serve (the caller then runs `ready`). Every rank must call it (reductions)."""
        raise NotImplementedError(f"{type(self).__name__} collects no statistics from the training steps")

    # ----------------------------------------------------------------- what the surgeon reads
    @abstractmethod
    def diag(self, name: str) -> torch.Tensor:
        """diag Q for layer `name`, shape (rows, cols), strictly positive."""

    @abstractmethod
    def matvec(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        """Q·V for V of shape (rows, cols) (weight coordinates only)."""

    def blocks(self, name: str, block_size: int) -> torch.Tensor:
        """Dense blocks of Q over consecutive weights of a row: (rows · ceil(cols/B), B, B).

        This default probes coordinate t of every block at once (B matvecs), so it is exact only
        when Q does not couple different blocks (diagonal Qs, block-diagonal Qs of the same
        blocking). Providers with coupled Q (Kronecker) override it with their entry formula.
        """
        rows, cols = self.layers[name].shape
        n_padded = -(-cols // block_size) * block_size
        columns = []
        for t in range(block_size):
            probe = torch.zeros(rows, n_padded, device=self.device(name))
            probe[:, t::block_size] = 1.0
            probe = probe[:, :cols]
            columns.append(row_blocks(self.matvec(name, probe), block_size))
        out = torch.stack(columns, dim=-1)  # [block, i, t] = Q[(block, i), (block, t)]
        valid = row_blocks(torch.ones(rows, cols, device=out.device), block_size)
        return out * valid[:, :, None] * valid[:, None, :]

    @property
    def coupled_block(self) -> int | None:
        """How far Q couples the weights of a layer: within row blocks of this many consecutive weights (1: Q is
        diagonal), or None: across blocks too (Kronecker). The Pruner checks the recipe's rules against it."""
        return None

    def row_model(self, name: str) -> RowModel | None:
        """The layer's row-wise OBS model, for `pruning.compensation: obc`; None when Q has no such form."""
        return None

    def mean_gradient(self, name: str) -> torch.Tensor | None:
        """The mean data-label gradient of the layer's weight matrix (rows, cols) from the last `ready`, for group
        OBS's first-order term; None where the provider takes none (`curvature.first_order` off)."""
        return None

    def input_mean(self, name: str) -> torch.Tensor | None:
        """μ = E[a] over the layer's input rows, (cols,), where the provider holds it (K-FAC's ones column), read
        inside `visit`: group OBS eliminates a consumer's free bias with it (`pruning/structured.py`); None where it
        is not held."""
        return None

    def output_factor(self, name: str) -> torch.Tensor | None:
        """The output-side Fisher G of a Kronecker model, (rows, rows) float64, or its diagonal (rows,) where only
        that is kept (the row model's G_ii); None without a row model."""
        model = self.row_model(name)
        return None if model is None else model.row_weight

    @classmethod
    def holds_row_model(cls, config: CurvatureConfig) -> bool:
        """Whether a provider built from `config` has `row_model`s (known before building it: `compensation: auto`)."""
        return False

    def visit(self, names: Iterable[str]) -> Iterator[str]:
        """`names` in order, each layer's curvature readable during its turn: a provider that spreads layers over the
        FSDP ranks (K-FAC's Ā) gathers one there. Every rank must run the same loop to its end."""
        yield from names

    def mask(self, name: str, keep: torch.Tensor) -> None:
        """Restrict Q to the surviving weights of layer `name` (`keep`: bool, (rows, cols))."""
        self.keep[name] = keep.to(torch.bool)

    def device(self, name: str) -> torch.device:
        return self.layers[name].weight.device

    # ----------------------------------------------------------------- plumbing shared by the providers
    def likelihood_of(self, model: nn.Module) -> Likelihood:
        """The likelihood of the true Fisher, resolved once from `config.likelihood` and the (unwrapped) model."""
        if self.likelihood is None:
            self.likelihood = likelihood_for(self.config.likelihood, getattr(unwrap(model), "config", None))
        return self.likelihood

    def estimated_bytes(self) -> int:
        """Bytes of curvature state, computable before allocating it (default: the state tensors)."""
        return self.memory_bytes()

    def check_memory(self, what: str, remedy: str, note: str = "") -> None:
        """Log the estimate up front; refuse above `curvature.max_memory_gib`, saying which knob lowers it."""
        gib = self.estimated_bytes() / 2**30
        log_main("%s for %d layers: %.3f GiB estimated%s", what, len(self.layers), gib, note)
        budget = self.config.max_memory_gib
        if budget is not None and gib > budget:
            raise CurvatureError(f"{what} needs {gib:.2f} GiB > `curvature.max_memory_gib` = {budget}; {remedy}")

    def memory_bytes(self) -> int:
        """Bytes of curvature state (including any optimiser state)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor map of the provider's learned or estimated state (saved with safetensors)."""
        return {}

    def state_meta(self) -> dict[str, Any]:
        """JSON-able scalars saved beside the tensors (counters, settings the state depends on)."""
        return {}

    def load_state_meta(self, meta: Mapping[str, Any]) -> None:
        """Restore `state_meta()`; runs before the tensors are copied in."""

    def rng_state(self) -> torch.Tensor:
        """This rank's generator state (saved per rank: ranks draw differently)."""
        return self.generator.get_state()

    def load_rng_state(self, state: torch.Tensor | None) -> None:
        """Continue from `state` (None: restart from the seed), applied when the generator is next made."""
        self._generator, self._saved_rng = None, state

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {**self.state_tensors(), "rng": self.rng_state()}, "meta": self.state_meta()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tensors = dict(state.get("tensors", {}))
        rng = tensors.pop("rng", None)
        self.load_state_meta(state.get("meta", {}))
        expected = self.state_tensors()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise CurvatureError(
                f"curvature state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for key, tensor in expected.items():
            if tuple(tensors[key].shape) != tuple(tensor.shape):
                raise CurvatureError(
                    f"curvature state `{key}` has shape {tuple(tensors[key].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(tensors[key])
        if rng is not None:
            self.load_rng_state(rng)


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed` (CUDA generators draw on the GPU: no host round trip)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def restore_rng(generator: torch.Generator, state: torch.Tensor) -> None:
    """Continue `generator` from a saved state; a state of another device's generator (a CPU run resumed on a GPU,
    or back) cannot continue there: the draws restart from the seed, with a warning."""
    expected = generator.get_state().numel()
    if state.numel() != expected:
        warn_main(
            "the curvature RNG state was saved on another kind of device (%d bytes, this %s generator takes %d): "
            "sampled labels and u restart from `curvature.seed`",
            state.numel(),
            generator.device.type,
            expected,
        )
        return
    generator.set_state(state.to(torch.uint8).cpu())


_CONFIGS: dict[str, type[CurvatureConfig]] = {}
_PROVIDERS: dict[str, type[CurvatureProvider]] = {}


def register_curvature(name: str, provider_cls: type[CurvatureProvider]) -> None:
    """Register a curvature method under the recipe name `pruning.method: <name>`."""
    if not name.isidentifier() or name in _PROVIDERS:
        raise ValueError(f"cannot register curvature method {name!r}: invalid or already registered")
    _CONFIGS[name] = provider_cls.config_class
    _PROVIDERS[name] = provider_cls


def registered_methods() -> list[str]:
    return sorted(_PROVIDERS)


def config_class_for(method: str) -> type[CurvatureConfig]:
    if method not in _CONFIGS:
        raise RecipeError(
            f"recipe key `pruning.method` = {method!r} is unknown; registered: {', '.join(registered_methods())}"
        )
    return _CONFIGS[method]


def provider_class_for(method: str) -> type[CurvatureProvider]:
    config_class_for(method)
    return _PROVIDERS[method]

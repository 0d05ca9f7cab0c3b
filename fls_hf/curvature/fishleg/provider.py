"""FishLeg: learn Q(λ) ≈ (F + γI)⁻¹ per layer by minimising the auxiliary loss

    A(λ; u) = ½ vᵀ(F + γI)v − uᵀv,   v = Q(λ)u,

whose minimiser over an unconstrained Q is exactly (F + γI)⁻¹ for any distribution of u
(Garcia et al., ICLR 2023; McGowan et al., arXiv:2412.02328). For pruning, u ~ N(0, I) on the
surviving weights, so Q is accurate along every coordinate direction OBS needs.

One aux step: draw u, form v = Q(λ)u (with a graph into λ), one Fisher-vector product F·v on a
batch, r = stopgrad((F + γ)v − u), optionally r ← Q r (preconditioned aux gradient), backpropagate
⟨v, r⟩ into λ (= J_λ(v)ᵀ r, the aux-loss gradient), all-reduce across ranks, Adam step on λ.
After pruning, u, v and F·v are masked so Q learns the inverse Fisher of the surviving weights.
The Q₀ each run starts from (`curvature.init`) is set in `warm_start.py`.

Lifecycle (what `ready` does before each pruning step, from the config alone):
- first call: warm start (`init`), then `warmup_steps` aux steps;
- later calls: with `rewarm`, a fresh warm start on the current weights (Adam moments cleared), then
  `refinement_steps` aux steps (without `rewarm`, only the aux steps, refining the previous Q);
- `on_optimizer_step`: one aux step every `refine_every` optimizer steps, once Q exists.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...distributed import all_reduce_mean_
from ...errors import CurvatureError
from ...fisher.likelihoods import Likelihood
from ...fisher.products import FISHER_PRODUCTS, sampled_gradient
from ...model.adapters import LayerAdapter
from ...model.blocks import row_blocks
from ...progress import progress
from ..base import Batches, CurvatureProvider, RowModel
from .config import FishLegConfig
from .structures import build_structure, structure_numel
from .warm_start import WarmStartInputs, warm_start

_BYTES_PER_LEARNED_VALUE = 4 * 4  # fp32 value, its gradient and two Adam moments
_BYTES_PER_FIXED_VALUE = 4  # no aux step ever runs: the gradient and Adam moments are never allocated


class FishLegProvider(CurvatureProvider):
    """Learned inverse Fisher, one `structures` module per layer, block-diagonal across layers.

    Example:
        >>> provider = FishLegProvider(resolve_targets(model, targets), FishLegConfig(damping=1e-3))
        >>> provider.ready(model, calibration_batches)        # warm start + `warmup_steps` aux steps
        >>> provider.diag("bert.encoder.layer.0.attention.self.query")
    """

    config_class = FishLegConfig

    def __init__(
        self, layers: Mapping[str, LayerAdapter], config: FishLegConfig, likelihood: Likelihood | None = None
    ) -> None:
        super().__init__(layers, config, likelihood)
        self.config: FishLegConfig = config
        knob = {"block_diagonal": "`curvature.block_size`", "kronecker": "`curvature.factor_block_size`"}.get(
            config.structure, "the structure"
        )
        self.check_memory(
            f"FishLeg curvature ({config.structure})",
            f"lower {knob}, choose a smaller `curvature.structure`, or target fewer layers with `pruning.targets`",
        )
        self.structures: dict[str, nn.Module] = {}
        for name, adapter in self.layers.items():
            rows, cols = adapter.shape
            self.structures[name] = build_structure(
                config.structure,
                rows,
                self._width(name),
                config.damping,
                block_size=config.block_size,
                factor_block_size=config.factor_block_size,
            ).to(adapter.weight.device)
        self.optimizer = torch.optim.Adam(self._parameters(), lr=config.aux_lr)
        self.prepared = False  # a warm start has set Q (the first `ready` does it)
        self.steps_done = 0
        self.skipped_steps = 0
        self._warned: set[str] = set()

    # ----------------------------------------------------------------- layout
    @property
    def coupled_block(self) -> int | None:
        return {"diagonal": 1, "block_diagonal": self.config.block_size}.get(self.config.structure)

    def models_bias(self, name: str) -> bool:
        """Whether Q covers the layer's bias as one more input column (Kronecker Q of a biased layer)."""
        return self.config.structure == "kronecker" and self.layers[name].bias is not None

    def _width(self, name: str) -> int:
        return self.layers[name].shape[1] + int(self.models_bias(name))

    def _parameters(self) -> list[nn.Parameter]:
        return [p for s in self.structures.values() for p in s.parameters()]

    def estimated_bytes(self) -> int:
        """Curvature memory (values, gradients, Adam moments), computable before allocating."""
        total = 0
        for name, adapter in self.layers.items():
            total += structure_numel(
                self.config.structure,
                adapter.shape[0],
                self._width(name),
                block_size=self.config.block_size,
                factor_block_size=self.config.factor_block_size,
            )
        cfg = self.config
        learns = cfg.warmup_steps or cfg.refinement_steps or cfg.refine_every
        return total * (_BYTES_PER_LEARNED_VALUE if learns else _BYTES_PER_FIXED_VALUE)

    def memory_bytes(self) -> int:
        return self.estimated_bytes()

    def _keep(self, name: str) -> torch.Tensor:
        """Keep mask over the structure's (rows, width) coordinates; the bias column is always kept."""
        rows, cols = self.layers[name].shape
        keep = torch.ones(rows, self._width(name), device=self.device(name))
        if name in self.keep:
            keep[:, :cols] = self.keep[name].to(keep.device, keep.dtype)
        return keep

    # ----------------------------------------------------------------- queries
    def diag(self, name: str) -> torch.Tensor:
        cols = self.layers[name].shape[1]
        with torch.no_grad():
            return self.structures[name].diag()[:, :cols].clamp_min(1e-12 / self.damping)

    def matvec(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        rows, cols = self.layers[name].shape
        padded = torch.zeros(rows, self._width(name), device=vector.device, dtype=torch.float32)
        padded[:, :cols] = vector
        with torch.no_grad():
            return self.structures[name].matvec(padded)[:, :cols]

    def blocks(self, name: str, block_size: int) -> torch.Tensor:
        cols = self.layers[name].shape[1]
        with torch.no_grad():
            valid = row_blocks(torch.ones(self.layers[name].shape, device=self.device(name)), block_size)
            return self.structures[name].row_block_entries(block_size, cols) * valid[:, :, None] * valid[:, None, :]

    def row_model(self, name: str) -> RowModel | None:
        """A Kronecker Q's within-row Hessian blocks (`KroneckerQ.row_model`); None for the other structures."""
        if self.config.structure != "kronecker":
            return None
        return self.structures[name].row_model(self.layers[name].shape[1])

    @classmethod
    def holds_row_model(cls, config: FishLegConfig) -> bool:
        return config.structure == "kronecker"

    # ----------------------------------------------------------------- learning
    def ready(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """Before a pruning step: warm start and warm-up the first time, then re-warm and / or refine (module doc)."""
        if not self.prepared:
            return self.prepare(model, batches)
        if self.config.rewarm:
            self.restart(model, itertools.islice(batches, self.config.num_batches))
        steps = self.config.refinement_steps
        return self.refine(model, self._calibration(model, batches), steps) if steps else {}

    def on_optimizer_step(self, model: nn.Module, batches: Batches, step: int) -> dict[str, float]:
        """One aux step every `refine_every` optimizer steps, once a warm start has set Q."""
        every = self.config.refine_every
        if not (self.prepared and every and step % every == 0):
            return {}
        return self.update(model, next(iter(batches)))

    def prepare(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """Warm start (unless Q was already learned) and `warmup_steps` aux steps over the calibration batches."""
        calibration = self._calibration(model, batches)
        if self.steps_done == 0:
            warm_start(self._warm_start_inputs(model), model, calibration)
        self.prepared = True
        return self.refine(model, calibration, self.config.warmup_steps, desc="FishLeg warm-up")

    def restart(self, model: nn.Module, batches: Batches) -> None:
        """A fresh warm start on the model as it is now (`curvature.rewarm`), Adam moments cleared.

        A few aux steps at a small learning rate move a log-parameterised Q by a few percent, while
        pruning can change the Fisher by an order of magnitude (BatchNorm rescales what follows a pruned
        conv): re-running the cheap warm-start statistics lets the aux steps refine from where F is now."""
        calibration = self._calibration(model, batches)
        warm_start(self._warm_start_inputs(model), model, calibration)
        self.prepared = True
        self.optimizer.state.clear()

    def _warm_start_inputs(self, model: nn.Module) -> WarmStartInputs:
        return WarmStartInputs(
            self.layers,
            self.structures,
            self.config,
            self.likelihood_of(model),
            self.generator,
            dict(self.keep),
            frozenset(n for n in self.layers if self.models_bias(n)),
        )

    def _calibration(self, model: nn.Module, batches: Batches) -> list[Mapping[str, Any]]:
        """The first `num_batches` batches (at least one), with the likelihood resolved for this model."""
        calibration = list(itertools.islice(batches, self.config.num_batches))
        if not calibration:
            raise CurvatureError(
                "empty calibration dataloader: FishLeg needs at least one batch to learn the curvature"
            )
        self.likelihood_of(model)
        return calibration

    def refine(
        self, model: nn.Module, batches: list[Mapping[str, Any]], steps: int, desc: str = "FishLeg refinement"
    ) -> dict[str, float]:
        """`steps` aux steps, cycling over `batches`; returns the last step's diagnostics."""
        diagnostics: dict[str, float] = {}
        for batch in progress(itertools.islice(itertools.cycle(batches), steps), total=steps, desc=desc):
            diagnostics = self.update(model, batch)
        return diagnostics

    def _tangents(self, v: dict[str, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
        tangents: dict[nn.Parameter, torch.Tensor] = {}
        for name, vec in v.items():
            adapter = self.layers[name]
            cols = adapter.shape[1]
            tangents[adapter.weight] = adapter.from_matrix(vec[:, :cols])
            if self.models_bias(name):
                tangents[adapter.bias] = vec[:, cols]
        return tangents

    def _as_matrices(
        self, tangents: dict[nn.Parameter, torch.Tensor], values: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        by_param = dict(zip(tangents, values))
        out = {}
        for name, adapter in self.layers.items():
            parts = [adapter.to_matrix(by_param[adapter.weight])]
            if self.models_bias(name):
                parts.append(by_param[adapter.bias][:, None])
            out[name] = torch.cat(parts, dim=1)
        return out

    def _draw_u(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        keeps = {name: self._keep(name) for name in self.layers}
        if self.config.u_sampling == "gaussian":
            g = self.generator  # on the layers' device: u never crosses the host
            return {n: torch.randn(k.shape, generator=g, device=g.device).to(k.device) * k for n, k in keeps.items()}
        params = list(
            self._tangents({n: torch.zeros_like(k) for n, k in keeps.items()})
        )  # each layer's weight (and bias)
        gradient = sampled_gradient(model, batch, params, self.likelihood_of(model), self.generator)
        grads = self._as_matrices(dict.fromkeys(params), gradient)
        # masked, then scaled so E‖u‖² matches a Gaussian u on the kept coordinates
        return {
            n: g * keeps[n] * keeps[n].sum().sqrt() / (g * keeps[n]).norm().clamp_min(1e-30) for n, g in grads.items()
        }

    def update(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float]:
        """One aux step on `batch`; returns aux loss, residual ‖(F+γ)Qu − u‖/‖u‖ and steps done.

        A layer whose Fisher product or λ-gradient is not finite keeps its Q for this step (warned once);
        the other layers still learn, and the diagnostics cover them only.
        """
        likelihood = self.likelihood_of(model)
        u = self._draw_u(model, batch)
        v = {n: self.structures[n].matvec(u[n]) * self._keep(n) for n in self.layers}
        tangents = self._tangents({n: x.detach() for n, x in v.items()})
        product = FISHER_PRODUCTS[self.config.fisher_product]
        extra = {"generator": self.generator} if self.config.fisher_product == "hvp" else {}
        fv = self._as_matrices(tangents, product(model, batch, tangents, likelihood, **extra))
        r = {n: (fv[n] + self.damping * v[n].detach() - u[n]) * self._keep(n) for n in self.layers}
        terms = self._diagnostic_terms(u, v, fv, r)
        if self.config.precondition_aux:
            with torch.no_grad():
                r = {n: self.structures[n].matvec(r[n]) * self._keep(n) for n in self.layers}
        self.optimizer.zero_grad(set_to_none=False)
        sum((v[n] * r[n]).sum() for n in self.layers).backward()
        grads = [p.grad for p in self._parameters()]
        all_reduce_mean_(grads)
        bad = self._non_finite_layers(r)
        good = [n for n in self.layers if n not in bad]
        diagnostics = self._summarise(terms, good or list(self.layers))
        if bad:
            self._skip(bad)
        if not good:
            return {**diagnostics, "skipped": 1.0}
        self._set_lr()
        self.optimizer.step()
        self.steps_done += 1
        diagnostics["aux_steps"] = float(self.steps_done)
        return diagnostics

    def _diagnostic_terms(self, u: dict, v: dict, fv: dict, r: dict) -> dict[str, torch.Tensor]:
        """Per layer, before preconditioning: [½vᵀ(F+γ)v − uᵀv, ‖r‖², ‖u‖²] as a (3,) tensor."""
        terms = {}
        for n in self.layers:
            vd = v[n].detach()
            aux = 0.5 * (vd * (fv[n] + self.damping * vd)).sum() - (u[n] * vd).sum()
            terms[n] = torch.stack([aux, r[n].pow(2).sum(), u[n].pow(2).sum()])
        return terms

    def _summarise(self, terms: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
        aux, rr, uu = sum(terms[n].double().cpu() for n in names).tolist()
        return {"aux_loss": aux, "residual": math.sqrt(rr / max(uu, 1e-30)), "aux_steps": float(self.steps_done)}

    def _non_finite_layers(self, residuals: dict[str, torch.Tensor]) -> list[str]:
        """Layers whose aux residual or λ-gradient is not finite (the step must not touch their Q)."""
        return [
            n
            for n, s in self.structures.items()
            if not torch.isfinite(residuals[n]).all() or any(not torch.isfinite(p.grad).all() for p in s.parameters())
        ]

    def _skip(self, bad: list[str]) -> None:
        """Count the step as skipped and drop the bad layers' λ-gradients (Adam leaves gradient-less parameters be)."""
        self.skipped_steps += 1
        for name in bad:
            for param in self.structures[name].parameters():
                param.grad = None
        key = ",".join(bad)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"FishLeg aux step skipped for {', '.join(bad)}: non-finite values; keeping their last good Q",
                RuntimeWarning,
                stacklevel=3,
            )

    def _set_lr(self) -> None:
        lr = self.config.aux_lr
        if self.config.aux_lr_schedule == "linear":
            progress_fraction = min(self.steps_done / max(self.config.warmup_steps, 1), 1.0)
            lr *= 1.0 - 0.9 * progress_fraction
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, structure in self.structures.items():
            for pname, param in structure.named_parameters():
                tensors[f"{name}/{pname}"] = param.data
                state = self.optimizer.state.get(param, {})
                for moment in ("exp_avg", "exp_avg_sq"):
                    if moment in state:
                        tensors[f"{name}/{pname}/{moment}"] = state[moment]
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "skipped_steps": self.skipped_steps,
            "structure": self.config.structure,
            "prepared": self.prepared,
        }

    def load_state_meta(self, meta: Mapping[str, Any]) -> None:
        if meta.get("structure", self.config.structure) != self.config.structure:
            raise CurvatureError(
                f"saved FishLeg state has structure {meta.get('structure')!r}, the recipe asks for "
                f"{self.config.structure!r}"
            )
        steps = int(meta.get("steps_done", 0))
        if steps > 0:  # materialise Adam moments so their saved values have somewhere to go
            for param in self._parameters():
                st = self.optimizer.state[param]
                st.setdefault("step", torch.tensor(float(steps)))
                st.setdefault("exp_avg", torch.zeros_like(param))
                st.setdefault("exp_avg_sq", torch.zeros_like(param))
        self.steps_done = steps
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        # states saved before `prepared` existed: a learned Q (aux steps taken) counts as prepared
        self.prepared = bool(meta.get("prepared", steps > 0))

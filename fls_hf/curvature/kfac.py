"""K-FAC curvature with exact damping: Q = (G ⊗ Ā + γI)⁻¹ per layer, re-estimated at every `ready`.

From sampled-label passes (`fisher.kronecker`): Ā = E[a aᵀ] over real tokens (cols², the bias column dropped)
and G = E_n[Σ_t δ δᵀ] (rows², or its diagonal for layers wider than `max_full_g_rows` and for every layer under
row-wise OBC, whose row model reads only G_ii). With the eigenbases
Ā = U_A diag(λ_A) U_Aᵀ and G = U_G diag(λ_G) U_Gᵀ, the damped inverse is exact (no factored damping):

    Q V = U_G [(U_Gᵀ V U_A) ⊘ (λ_G λ_Aᵀ + γ)] U_Aᵀ,     diag Q = (U_G ⊙ U_G) D (U_A ⊙ U_A)ᵀ,  D = 1 ⊘ (λ_G λ_Aᵀ + γ).

γ is `curvature.damping` itself (`damping_mode: absolute`) or, by default (`relative`), that multiple of the mean
diagonal of the K-FAC Fisher over every targeted layer, mean_l,i,j(G_ii Ā_jj), re-taken with the statistics: the
Fisher of a mean token loss is orders of magnitude below a classifier's (MiniLM 4e-5, a char-level LM 8e-6), so
an absolute default fits one of them only. One γ for all layers keeps the saliencies in the same loss units.

For the row-wise OBC surgeon (`pruning.compensation: obc`) it also gives each layer's row model: keeping the
within-row part of K-FAC, ΔL ≈ ½ Σ_i Δw_iᵀ (G_ii Ā + γI) Δw_i, so row i is an OBS problem of its own with one
eigenbasis of Ā shared by all rows (`RowModel`). Q is the whole layer's: masks enter through the statistics of
the pruned model at the next `ready`, and the OBC solve keeps pruned weights at zero itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import ShardCounts, all_reduce_mean_
from ..errors import CurvatureError
from ..fisher.gradients import data_gradients
from ..fisher.kronecker import kronecker_statistics
from ..fisher.likelihoods import Likelihood
from ..fisher.training import TrainingStatistics
from ..model.adapters import LayerAdapter
from ..progress import log_main, warn_main
from .base import Batches, CurvatureProvider, RowModel
from .config import FULL_G_ROWS, KFACConfig

_ENTRY_CHUNK = 2**24  # rows · cols · cols elements per chunk of `blocks`


class KFACProvider(CurvatureProvider):
    """Q = (G ⊗ Ā + γI)⁻¹ from K-FAC statistics taken afresh before every pruning step; before that Q = I/γ.

    Example:
        >>> provider = KFACProvider(resolve_targets(model, targets), KFACConfig(num_examples=256))
        >>> provider.ready(model, calibration_batches)
        >>> provider.row_model("bert.encoder.layer.0.attention.self.query").inverse_diag()   # (rows, cols)
    """

    config_class = KFACConfig

    def __init__(self, layers: Mapping[str, LayerAdapter], config: KFACConfig, likelihood: Likelihood | None = None):
        super().__init__(layers, config, likelihood)
        self.config: KFACConfig = config
        limit = FULL_G_ROWS if config.max_full_g_rows is None else config.max_full_g_rows
        self.full_g = {n for n, a in self.layers.items() if a.shape[0] <= limit}
        sharded = sorted(n for n in self.full_g if self.layers[n].sharded)
        if sharded:  # a full G couples the rows that FSDP2 spreads over the ranks
            raise CurvatureError(
                f"K-FAC with a full G for `{sharded[0]}`, whose rows are sharded (FSDP2): under FSDP kfac keeps "
                "diag G, so use `pruning.compensation: obc` (the default) or set `curvature.max_full_g_rows: 0`"
            )
        narrow = sorted(set(self.layers) - self.full_g)
        if narrow and limit > 0:  # 0: diag G asked for everywhere (the row-wise OBC rule reads nothing more)
            warnings.warn(
                f"K-FAC keeps only diag G for {len(narrow)} layer(s) with more than `curvature.max_full_g_rows` = "
                f"{limit} rows (e.g. `{narrow[0]}`): their Q ignores output-side correlations",
                RuntimeWarning,
                stacklevel=2,
            )
        self.check_memory(
            "K-FAC curvature",
            "lower `curvature.max_full_g_rows` (wide layers keep diag G) or target fewer layers with `pruning.targets`",
        )
        self.a_bar: dict[str, torch.Tensor] = {}  # FSDP2: the layers this rank owns only (`shards`)
        self.a_mean: dict[str, torch.Tensor] = {}  # μ = E[a], Ā's ones column (a bias's input); kept with Ā
        self.g: dict[str, torch.Tensor] = {}
        self._eigen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # full-G layers: (U_G, D), fp32
        self._rows: dict[str, RowModel] = {}  # FSDP2: owned layers, and the one being visited
        self._row_weight_mean: dict[str, float | None] = {}
        self._owners: dict[str, int] | None = None
        self.gradients: dict[str, torch.Tensor] = {}  # `first_order`: the last pass's mean data-label gradients
        self.estimated = False
        self._gamma = config.damping  # γ of Q = I/γ until the first estimate; relative mode re-sets it there
        for name, adapter in self.layers.items():
            rows, cols = adapter.shape
            device = adapter.weight.device
            self.a_bar[name] = torch.zeros(cols, cols, device=device)
            self.a_mean[name] = torch.zeros(cols, device=device)
            self.g[name] = torch.zeros((rows, rows) if name in self.full_g else (rows,), device=device)

    @property
    def shards(self) -> ShardCounts | None:
        return self._shards

    @shards.setter
    def shards(self, shards: ShardCounts | None) -> None:
        """FSDP2: besides G's rows, Ā is sharded by layers — each rank keeps the Ā (and its eigenbasis) of the layers
        it owns, about 1 / world size of them by bytes, and broadcasts one while the ranks visit it (`visit`)."""
        self._shards = shards
        if shards is None:
            self._owners = None
            return
        self._owners = shards.owners({n: a.shape[1] ** 2 for n, a in self.layers.items()})
        for name in self.layers:
            if not self._owns(name):
                self.a_bar.pop(name, None)
                self.a_mean.pop(name, None)
                self._rows.pop(name, None)

    def _owns(self, name: str) -> bool:
        return self._owners is None or self._owners[name] == self._shards.rank

    def estimated_bytes(self) -> int:
        """Per layer: Ā and G (fp32), Ā's eigenbasis (fp64, the row model's); a full G's eigenbasis and Q's spectrum
        (fp32); the mean gradient under `first_order` (fp32). Diag-G layers compute their spectrum when asked."""
        total = 0
        for name, adapter in self.layers.items():
            rows, cols = adapter.shape
            full = name in self.full_g
            total += 4 * (cols * cols + cols + (rows * rows if full else rows)) + 8 * (cols * cols + cols + rows)
            total += 4 * (rows * rows + rows * cols) if full else 0
            total += 4 * rows * cols if self.config.first_order else 0  # the mean gradient
        return total

    # ----------------------------------------------------------------- estimation
    def ready(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """Ā, G from `num_examples` examples of the model as it is now (`fisher_labels`); eigenbases; row models."""
        stats = kronecker_statistics(
            model,
            batches,
            self.layers,
            self.likelihood_of(model),
            generator=self.generator,
            max_examples=self.config.num_examples,
            full_g=self.full_g,
            labels=self.config.fisher_labels,
            owners=self.global_owners(),
        )
        if self.config.first_order:
            self._take_gradients(model, batches)
        return self._ready_from(stats)

    def _take_gradients(self, model: nn.Module, batches: Batches) -> None:
        """`first_order`: the mean data-label gradient over `num_examples` further calibration examples, averaged over
        the data-parallel ranks (structures, its only use, are refused under FSDP2 by the Pruner)."""
        sums = {n: torch.zeros(a.shape, device=a.weight.device) for n, a in self.layers.items()}
        examples, likelihood, limit = 0, self.likelihood_of(model), self.config.num_examples
        for size, grads in data_gradients(model, batches, self.layers, likelihood, max_examples=limit):
            for name, grad in grads.items():
                sums[name].add_(grad, alpha=size)
            examples += size
        if examples == 0:
            raise CurvatureError("empty calibration dataloader: `curvature.first_order` needs labelled examples")
        means = [t.div_(examples) for t in sums.values()]
        all_reduce_mean_(means)
        if not all(bool(torch.isfinite(t).all()) for t in means):
            raise CurvatureError("the mean data-label gradient is not finite; check the model's loss")
        self.gradients = sums

    def training_statistics(self) -> TrainingStatistics | None:
        return TrainingStatistics(self.layers, self.full_g) if self.config.statistics == "training" else None

    def ready_from_training(self, stats: TrainingStatistics) -> dict[str, float] | None:
        """Ā, G of the window (the training loss's empirical Fisher); None where no gradient reached a layer (frozen
        inputs, e.g. a PEFT model's first layer), warned with its name."""
        averaged = stats.averages(self.global_owners())  # the same on every rank: the decision is too
        silent = [n for n, (_, g) in averaged.items() if not bool(g.any())]
        if silent:
            warn_main(
                "fls_hf: no training-loss gradient reached `%s` (frozen inputs?); K-FAC statistics from a pass instead",
                silent[0],
            )
            return None
        return self._ready_from(averaged)

    def global_owners(self) -> dict[str, int] | None:
        """FSDP2: the global rank that keeps each layer's Ā (what `KroneckerSums.averages` reduces it to)."""
        return None if self._owners is None else {n: self._shards.global_rank(r) for n, r in self._owners.items()}

    def _ready_from(self, stats: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]) -> dict[str, float]:
        """Ā, G given as averaged statistics (`KroneckerSums.averages`: from a pass, or from the training steps);
        eigenbases; row models."""
        finite = [
            bool(torch.isfinite(g).all()) and (a is None or bool(torch.isfinite(a).all())) for a, g in stats.values()
        ]
        if self._shards is not None:  # Ā is checked where it is kept
            finite = self._shards.all_ok(finite)
        for (name, (a_bar, g)), ok in zip(stats.items(), finite):
            if not ok:
                raise CurvatureError(f"K-FAC statistics of `{name}` are not finite; check the model's activations")
            if a_bar is not None:
                self.a_bar[name].copy_(a_bar[:-1, :-1])
                self.a_mean[name].copy_(a_bar[:-1, -1])
            start, stop = self.layers[name].row_range  # FSDP2: this rank's rows of G (the statistics cover all)
            self.g[name].copy_(g[start:stop] if g.dim() == 1 else g)
        self.estimated = True
        self._refresh()
        return {"damping": self.damping}

    @property
    def damping(self) -> float:
        """γ of the current estimate (`damping_mode: relative`: scaled by the mean K-FAC Fisher diagonal)."""
        return self._gamma

    def _traces(self) -> tuple[list[float], list[float]]:
        """Per layer (in `layers` order) Σ_i G_ii over every rank's rows and tr Ā, in float64 (one reduction)."""
        g_sums = [float((g.diagonal() if g.dim() == 2 else g).double().sum()) for g in self.g.values()]
        a_traces = [float(self.a_bar[n].double().diagonal().sum()) if n in self.a_bar else 0.0 for n in self.layers]
        if self._shards is None:
            return g_sums, a_traces
        totals = self._shards.sum(g_sums + a_traces)  # an unowned Ā adds 0: its owner's trace
        return totals[: len(g_sums)], totals[len(g_sums) :]

    def _refresh(self) -> None:
        """γ; eigenbases of Ā (owned ones under FSDP2) and G (Q's exact damping) and the row models (Ā's basis,
        diag G, γ)."""
        g_sums, a_traces = self._traces()
        self._gamma = self.config.damping
        if self.config.damping_mode == "relative":  # both callers run it on estimated statistics
            # mean over every targeted weight of diag(G ⊗ Ā) = Σ_l tr G_l tr Ā_l / Σ_l rows_l cols_l
            count = sum(a.rows * a.shape[1] for a in self.layers.values())
            scale = sum(g * a for g, a in zip(g_sums, a_traces)) / count
            if not scale > 0:
                raise CurvatureError(
                    "K-FAC statistics are all zero (no output gradient reached the targeted layers), so "
                    "`curvature.damping_mode: relative` has no scale; use `damping_mode: absolute`"
                )
            self._gamma = self.config.damping * scale
            log_main("K-FAC: γ = %.3g × mean Fisher diagonal %.3g = %.3g", self.config.damping, scale, self._gamma)
        last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (Ā, λ, U) of the last eigh
        for (name, adapter), g_sum in zip(self.layers.items(), g_sums):
            # FSDP2: the mean G_ii over every rank's rows (the sweep's); whole layers take their own
            self._row_weight_mean[name] = None if self._shards is None else g_sum / adapter.rows
            if not self._owns(name):
                continue
            if last is not None and torch.equal(last[0], self.a_bar[name]):
                _, lam_a, u_a = last  # query / key / value read one input: one eigh (read-only tensors, shared)
            else:
                # in Ā's own float32 (its sums are float32: float64 would resolve only their rounding), then float64
                # for the surgeon's products; 2.7× faster at 1,536 columns on CPU, most of a pruning step's eigh time
                lam_a, u_a = (t.double() for t in torch.linalg.eigh(self.a_bar[name]))
                u_a = u_a.mT.contiguous().mT  # column-major (LAPACK's already): what `visit` broadcasts into
                lam_a = lam_a.clamp_min(0)
                last = (self.a_bar[name], lam_a, u_a)
            g = self.g[name].double()
            if g.dim() == 2:  # G's eigenbasis and Q's spectrum, kept: a full G is not the row model's diag G
                lam_g, u_g = torch.linalg.eigh(g)
                inverse_eigen = 1.0 / (lam_g.clamp_min(0)[:, None] * lam_a[None, :] + self.damping)
                self._eigen[name] = (u_g.float(), inverse_eigen.float())
            self._rows[name] = self._row_model_of(name, u_a, lam_a, self.a_bar[name], self.a_mean[name])

    def _row_model_of(
        self, name: str, basis: torch.Tensor, eigenvalues: torch.Tensor, matrix: torch.Tensor, mean: torch.Tensor
    ) -> RowModel:
        g = self.g[name].double()
        row_weight = (g.diagonal() if g.dim() == 2 else g).clamp_min(0)
        return RowModel(
            basis,
            eigenvalues,
            row_weight,
            self.damping,
            row_weight_mean=self._row_weight_mean[name],
            matrix=matrix,
            input_mean=mean,
        )

    def visit(self, names: Iterable[str]) -> Iterator[str]:
        """FSDP2: before each layer's turn its owner broadcasts Ā and its eigenbasis, and the other ranks build the
        layer's row model for their rows, dropped when the loop moves on (one layer's Ā and basis held beyond the
        owned ones). Every rank must run the same loop to its end."""
        for name in names:
            if self._owners is None or not self.estimated:
                yield name
                continue
            if self._owns(name):
                rows = self._rows[name]
                owned = [rows.basis, rows.eigenvalues, rows.matrix, rows.input_mean]
                self._shards.broadcast_(owned, self._owners[name])
                yield name
                continue
            cols = self.layers[name].shape[1]
            # column-major, as `eigh` gives the owner: the same layout takes the same BLAS paths (same rounding)
            basis = torch.empty(cols, cols, dtype=torch.float64, device=self.g[name].device).mT
            eigenvalues = torch.empty(cols, dtype=torch.float64, device=basis.device)
            a_bar = torch.empty(cols, cols, dtype=torch.float32, device=basis.device)  # OBC's products read Ā itself
            mean = torch.empty(cols, dtype=torch.float32, device=basis.device)
            self._shards.broadcast_([basis, eigenvalues, a_bar, mean], self._owners[name])
            self._rows[name] = self._row_model_of(name, basis, eigenvalues, a_bar, mean)
            try:
                yield name
            finally:
                del self._rows[name]

    # ----------------------------------------------------------------- queries
    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(U_A, U_G or None for diag G, D = 1 ⊘ (λ_G λ_Aᵀ + γ)) in fp32; a diag G's D is the row model's spectrum."""
        rows = self._resident(name)
        u_g, inverse_eigen = self._eigen.get(name, (None, None))
        return rows.basis.float(), u_g, rows.spectrum().float() if inverse_eigen is None else inverse_eigen

    def _resident(self, name: str) -> RowModel:
        if name not in self._rows:
            raise CurvatureError(
                f"K-FAC curvature of `{name}` is held by FSDP rank {(self._owners or {}).get(name)}: read it inside "
                "`provider.visit`"
            )
        return self._rows[name]

    def _row_mix(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_A, (U_G ⊙ U_G) D): Ā's basis and how each row (rows, cols) weighs its eigendirections, fp32."""
        u_a, u_g, inverse_eigen = self._factors(name)
        return u_a, inverse_eigen if u_g is None else u_g.square() @ inverse_eigen

    def diag(self, name: str) -> torch.Tensor:
        if not self.estimated:
            return torch.full(self.layers[name].shape, 1.0 / self.damping, device=self.device(name))
        u_a, mix = self._row_mix(name)
        return mix @ u_a.square().T

    def matvec(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        if not self.estimated:
            return vector / self.damping
        u_a, u_g, inverse_eigen = self._factors(name)
        v = vector.to(u_a.dtype) @ u_a
        if u_g is not None:
            v = u_g.T @ v
        v = v * inverse_eigen
        if u_g is not None:
            v = u_g @ v
        return v @ u_a.T

    def blocks(self, name: str, block_size: int) -> torch.Tensor:
        """Exact entries Q[(i, j), (i, k)] = Σ_b U_A[j, b] U_A[k, b] C[i, b], C = (U_G ⊙ U_G) D, per row block."""
        if not self.estimated:
            return super().blocks(name, block_size)
        rows, cols = self.layers[name].shape
        u_a, mix = self._row_mix(name)
        nblocks = -(-cols // block_size)
        padded = torch.zeros(nblocks * block_size, cols, device=u_a.device, dtype=u_a.dtype)
        padded[:cols] = u_a
        basis = padded.view(nblocks, block_size, cols)  # [block, j, b]
        step = max(1, _ENTRY_CHUNK // (nblocks * block_size * cols))
        parts = []
        for start in range(0, rows, step):
            weighted = mix[start : start + step, None, None, :] * basis[None]  # [i, block, j, b]
            parts.append(weighted @ basis.transpose(1, 2)[None])  # [i, block, j, k]
        return torch.cat(parts).reshape(rows * nblocks, block_size, block_size)

    def row_model(self, name: str) -> RowModel | None:
        return self._resident(name) if self.estimated else None

    def mean_gradient(self, name: str) -> torch.Tensor | None:
        return self.gradients.get(name)

    def input_mean(self, name: str) -> torch.Tensor | None:
        return self._resident(name).input_mean if self.estimated else None

    def output_factor(self, name: str) -> torch.Tensor | None:
        g = self.g[name]  # a full G where this layer keeps one, else the row model's diag G
        return g.double() if self.estimated and g.dim() == 2 else super().output_factor(name)

    @classmethod
    def holds_row_model(cls, config: KFACConfig) -> bool:
        return True

    def memory_bytes(self) -> int:
        """The state tensors and what is derived from them: Ā's eigenbases (float64) and a full G's."""
        derived = [t for m in self._rows.values() for t in (m.basis, m.eigenvalues)]
        derived += [t for pair in self._eigen.values() for t in pair]
        derived = list({id(t): t for t in derived}.values())  # layers with one input share their eigenbasis
        return super().memory_bytes() + sum(t.numel() * t.element_size() for t in derived)

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **{f"{n}/a_bar": t for n, t in self.a_bar.items()},
            **{f"{n}/input_mean": t for n, t in self.a_mean.items()},
            **{f"{n}/g": t for n, t in self.g.items()},
        }

    def state_meta(self) -> dict[str, Any]:
        return {"estimated": self.estimated}

    def load_state_meta(self, meta: Mapping[str, Any]) -> None:
        self.estimated = bool(meta.get("estimated", False))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tensors = dict(state.get("tensors", {}))
        for name, g in self.g.items():  # a full G saved where this run keeps diag G (checkpoints before session 9)
            saved = tensors.get(f"{name}/g")
            if g.dim() == 1 and saved is not None and saved.dim() == 2:
                tensors[f"{name}/g"] = saved.diagonal().clone()
        for name, mean in self.a_mean.items():  # checkpoints before session 25: zeros, no bias in group OBS
            tensors.setdefault(f"{name}/input_mean", torch.zeros_like(mean))
        super().load_state_dict({**state, "tensors": tensors})
        if self.estimated:
            self._refresh()

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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import summed
from ..errors import CurvatureError
from ..fisher.kronecker import kronecker_statistics
from ..fisher.likelihoods import Likelihood
from ..model.adapters import LayerAdapter
from ..progress import log_main
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
        self.a_bar: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self._eigen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # full-G layers: (U_G, D), fp32
        self._rows: dict[str, RowModel] = {}
        self.estimated = False
        self._gamma = config.damping  # γ of Q = I/γ until the first estimate; relative mode re-sets it there
        for name, adapter in self.layers.items():
            rows, cols = adapter.shape
            device = adapter.weight.device
            self.a_bar[name] = torch.zeros(cols, cols, device=device)
            self.g[name] = torch.zeros((rows, rows) if name in self.full_g else (rows,), device=device)

    def estimated_bytes(self) -> int:
        """Per layer: Ā and G (fp32), Ā's eigenbasis (fp64, the row model's); a full G's eigenbasis and Q's spectrum
        (fp32). Diag-G layers compute their spectrum when asked."""
        total = 0
        for name, adapter in self.layers.items():
            rows, cols = adapter.shape
            full = name in self.full_g
            total += 4 * (cols * cols + (rows * rows if full else rows)) + 8 * (cols * cols + cols + rows)
            total += 4 * (rows * rows + rows * cols) if full else 0
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
        )
        for name, (a_bar, g) in stats.items():
            if not (torch.isfinite(a_bar).all() and torch.isfinite(g).all()):
                raise CurvatureError(f"K-FAC statistics of `{name}` are not finite; check the model's activations")
            self.a_bar[name].copy_(a_bar[:-1, :-1])
            start, stop = self.layers[name].row_range  # FSDP2: this rank's rows of G (the statistics cover all)
            self.g[name].copy_(g[start:stop] if g.dim() == 1 else g)
        self.estimated = True
        self._refresh()
        return {"damping": self.damping}

    @property
    def damping(self) -> float:
        """γ of the current estimate (`damping_mode: relative`: scaled by the mean K-FAC Fisher diagonal)."""
        return self._gamma

    def _scale(self) -> float:
        """mean over every targeted weight of diag(G ⊗ Ā) = Σ_l tr G_l tr Ā_l / Σ_l rows_l cols_l."""
        total = count = 0.0
        for name, g in self.g.items():
            g_diag = g.diagonal() if g.dim() == 2 else g
            total += float(g_diag.double().sum() * self.a_bar[name].double().diagonal().sum())
            count += g_diag.numel() * self.a_bar[name].shape[0]
        total, count = summed(self.shards, [total, count])  # FSDP2: G's rows are spread over the ranks
        return total / count

    def _refresh(self) -> None:
        """γ; eigenbases of Ā and G (Q's exact damping) and the row models (Ā's basis, diag G, γ)."""
        self._gamma = self.config.damping
        if self.config.damping_mode == "relative":  # both callers run it on estimated statistics
            scale = self._scale()
            if not scale > 0:
                raise CurvatureError(
                    "K-FAC statistics are all zero (no output gradient reached the targeted layers), so "
                    "`curvature.damping_mode: relative` has no scale; use `damping_mode: absolute`"
                )
            self._gamma = self.config.damping * scale
            log_main("K-FAC: γ = %.3g × mean Fisher diagonal %.3g = %.3g", self.config.damping, scale, self._gamma)
        means = self._row_weight_means()
        for name in self.layers:
            a_bar, g = self.a_bar[name].double(), self.g[name].double()
            lam_a, u_a = torch.linalg.eigh(a_bar)
            lam_a = lam_a.clamp_min(0)
            if g.dim() == 2:  # G's eigenbasis and Q's spectrum, kept: a full G is not the row model's diag G
                lam_g, u_g = torch.linalg.eigh(g)
                inverse_eigen = 1.0 / (lam_g.clamp_min(0)[:, None] * lam_a[None, :] + self.damping)
                self._eigen[name] = (u_g.float(), inverse_eigen.float())
            row_weight = (g.diagonal() if g.dim() == 2 else g).clamp_min(0)
            self._rows[name] = RowModel(u_a, lam_a, row_weight, self.damping, row_weight_mean=means[name])

    def _row_weight_means(self) -> dict[str, float | None]:
        """FSDP2: mean G_ii over every rank's rows of each layer (one reduction); None where G is whole."""
        if self.shards is None:
            return dict.fromkeys(self.layers)
        local = [v for n in self.layers for v in (float(self.g[n].clamp_min(0).double().sum()), self.g[n].numel())]
        totals = self.shards.sum(local)
        return {n: totals[2 * i] / max(totals[2 * i + 1], 1) for i, n in enumerate(self.layers)}

    # ----------------------------------------------------------------- queries
    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(U_A, U_G or None for diag G, D = 1 ⊘ (λ_G λ_Aᵀ + γ)) in fp32; a diag G's D is the row model's spectrum."""
        rows = self._rows[name]
        u_g, inverse_eigen = self._eigen.get(name, (None, None))
        return rows.basis.float(), u_g, rows.spectrum().float() if inverse_eigen is None else inverse_eigen

    def _row_mix(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_A, (U_G ⊙ U_G) D): Ā's basis and how each row (rows, cols) weighs its eigendirections, fp32."""
        u_a, u_g, inverse_eigen = self._factors(name)
        return u_a, inverse_eigen if u_g is None else u_g.square() @ inverse_eigen

    def diag(self, name: str) -> torch.Tensor:
        if name not in self._rows:
            return torch.full(self.layers[name].shape, 1.0 / self.damping, device=self.device(name))
        u_a, mix = self._row_mix(name)
        return mix @ u_a.square().T

    def matvec(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        if name not in self._rows:
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
        if name not in self._rows:
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
        return self._rows.get(name)

    @classmethod
    def holds_row_model(cls, config: KFACConfig) -> bool:
        return True

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"{n}/a_bar": t for n, t in self.a_bar.items()}, **{f"{n}/g": t for n, t in self.g.items()}}

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
        super().load_state_dict({**state, "tensors": tensors})
        if self.estimated:
            self._refresh()

"""Kronecker (K-FAC) Fisher statistics from sampled-label passes, used to initialise FishLeg's Q.

For a linear map with inputs a_t and output gradients δ_t at token positions t, the per-example
gradient is g = Σ_t δ_t a_tᵀ. K-FAC treats δ and a as independent and tokens as uncorrelated:

    F ≈ G ⊗ Ā,   G = E_n[Σ_t δ_nt δ_ntᵀ],   Ā = E_{n,t}[ā āᵀ]  (ā = [a; 1]),

with labels sampled from the model (true Fisher). Ā always carries the ones column, whether or not
the layer has a bias; structures that do not model the bias drop it. By default only diag G (rows,) and Ā
((cols+1)²) are kept: the FishLeg structures need no more (diagonal: G_ii Ā_jj; within-row blocks:
G_ii Ā_JJ). Linear and GPT-2 Conv1D layers use their token positions; a plain Conv2d (groups=1, zero
padding) is the same map at every output position, with a_t the input patch under t (im2col,
`patches.py`; "KFC", Grosse & Martens 2016): its positions are all real, whatever the attention mask.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_mean_, rank, reduce_mean_
from ..errors import CurvatureError
from ..model.adapters import Conv1DAdapter, LayerAdapter
from ..model.forward import (
    curvature_mode,
    logits_of,
    model_device,
    model_inputs,
    requires_grad,
    token_masks,
    unwrap,
    valid_rows,
    with_decoder_inputs,
)
from ..model.patches import conv_obstacle, conv_output_rows, conv_patches
from ..progress import example_progress
from .gradients import example_losses, fisher_targets, is_causal_lm
from .hooks import layer_hooks
from .likelihoods import Likelihood

_GRAM_BLOCK = 384  # columns per block of Σ ā āᵀ's upper triangle (`_add_gram`): large enough to stay GEMM-bound


def check_supported(layers: Mapping[str, LayerAdapter]) -> None:
    """K-FAC's map a → W a + b holds for Linear, Conv1D and plain Conv2d layers only."""
    for name, adapter in layers.items():
        module = adapter.module
        if isinstance(module, nn.Conv2d) and conv_obstacle(module) is not None:
            raise CurvatureError(
                f"`curvature.init: kfac` supports plain Conv2d layers only (groups=1, padding_mode='zeros'); `{name}` "
                "has "
                f"{conv_obstacle(module)}: use another `curvature.init` or add it to `pruning.ignore`"
            )
        if not isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(adapter, Conv1DAdapter):
            raise CurvatureError(
                f"`curvature.init: kfac` supports Linear, Conv1D and Conv2d layers; `{name}` is {type(module).__name__}"
            )


class KroneckerSums:
    """Running K-FAC sums per layer: Σ ā āᵀ over real tokens and Σ δ δᵀ (or Σ δ², diag G) over every position, with
    the token and example counts that turn them into Ā and G (`averages`).

    `observe` is the body of a layer's forward hook: it adds the layer's input and registers a tensor hook on the
    output that adds δ δᵀ as the backward passes. Shared by the statistics pass (`kronecker_statistics`) and the
    collection from the training steps themselves (`fisher/training.py`).
    """

    def __init__(self, layers: Mapping[str, LayerAdapter], device: torch.device, full_g: Container[str] = ()):
        self.a = {n: torch.zeros(a.shape[1] + 1, a.shape[1] + 1, device=device) for n, a in layers.items()}
        # every row, also when sharded
        self.g = {n: torch.zeros((a.rows,) * (2 if n in full_g else 1), device=device) for n, a in layers.items()}
        self.tokens = dict.fromkeys(layers, 0.0)  # per layer: a conv's positions are not the tokens
        self.examples = 0
        self.device = device

    def observe(self, batch: Mapping[str, Any], name: str, module: nn.Module, a: torch.Tensor, output: torch.Tensor):
        """Add the layer's input rows (the batch's attention mask picks the real tokens); δ δᵀ follows in the
        backward."""
        conv = isinstance(module, nn.Conv2d)
        a = _input_rows(module, a.detach())
        mask = _token_mask(batch, a, self.device, conv=conv)
        self.tokens[name] += float(mask.sum())
        _add_gram(self.a[name], a[mask])
        if output.requires_grad:
            output.register_hook(lambda grad, name=name, conv=conv: _add_output_gradient(self.g[name], grad, conv))

    def add_(self, other: KroneckerSums, g_scale: float = 1.0) -> None:
        """self += other, other's G sums scaled by `g_scale`."""
        for name in self.a:
            self.a[name] += other.a[name]
            self.g[name].add_(other.g[name], alpha=g_scale)
            self.tokens[name] += other.tokens[name]
        self.examples += other.examples

    def zero_(self) -> None:
        for name in self.a:
            self.a[name].zero_()
            self.g[name].zero_()
            self.tokens[name] = 0.0
        self.examples = 0

    def averages(self, owners: Mapping[str, int] | None = None) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        """name → (Ā, G): the sums over the tokens / examples, averaged over the data-parallel ranks (in place: the
        sums are spent). `owners` (FSDP2): Ā reaches its owner only (None elsewhere)."""
        if self.examples == 0:
            raise CurvatureError("empty calibration dataloader: K-FAC statistics need at least one batch")
        if any(count == 0 for count in self.tokens.values()):
            raise CurvatureError(
                "calibration batches hold no real token (every `attention_mask` entry is 0): K-FAC statistics "
                "(`curvature.init: kfac`) need unpadded tokens"
            )
        for name in self.a:
            upper = self.a[name].triu()  # `_add_gram` filled the upper blocks: mirror them
            self.a[name].copy_(upper + upper.triu(1).mT).mul_(1.0 / self.tokens[name])
            self.g[name].mul_(1.0 / self.examples)
        if owners is None:
            all_reduce_mean_([*self.a.values(), *self.g.values()])
            return {name: (self.a[name], self.g[name]) for name in self.a}
        all_reduce_mean_(list(self.g.values()))
        for name, a_bar in self.a.items():  # one layer at a time: no flat copy of every Ā
            reduce_mean_(a_bar, owners[name])
        return {name: (self.a[name] if owners[name] == rank() else None, self.g[name]) for name in self.a}


def _add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """total += āᵀā for ā = [x, 1] (the appended 1 is the bias's input), on and above the diagonal in blocks of
    ~`_GRAM_BLOCK` columns, the rest left for `averages` to mirror: with b blocks, (b + 1) / 2b of the full product
    (62 % for MiniLM's 1,536 FFN-out columns, the largest share of the statistics' time). The 1's row and column are
    x's column sums and the count, so x is never copied to append it."""
    cols = x.shape[1]
    parts = max(1, cols // _GRAM_BLOCK)
    edges = [round(i * cols / parts) for i in range(parts + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        total[start:stop, start:cols] += x[:, start:stop].T @ x[:, start:]  # in x's dtype (bf16 stays bf16)
    total[:cols, cols] += x.sum(dim=0)
    total[cols, cols] += x.shape[0]


def kronecker_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    layers: Mapping[str, LayerAdapter],
    likelihood: Likelihood,
    *,
    generator: torch.Generator | None = None,
    max_examples: int = 256,
    full_g: Container[str] = (),
    labels: str = "sampled",
    owners: Mapping[str, int] | None = None,
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """name → (Ā: (cols+1, cols+1), G), averaged over up to `max_examples` examples (and over the data-parallel
    ranks' examples).

    G is diag G: (rows,), or the full G: (rows, rows) for the layers named in `full_g`. `labels`: `sampled` draws
    the output gradients' labels from the model (true Fisher); `empirical` uses the batch's `labels` (as oBERT's
    empirical Fisher; causal LMs: logits[:, :-1] against labels[:, 1:]). `owners` (FSDP2, Ā sharded by layers): the
    global rank that keeps each layer's Ā; it alone receives the average, the others get None and free theirs.

    Memory: each layer's ā āᵀ is added up in its forward hook and δ δᵀ in a hook on its output's gradient, with
    every parameter frozen, so the pass holds no layer input, output gradient or weight gradient beyond what
    autograd needs for the backward itself (less than a training step's).
    """
    model = unwrap(model)
    shift = labels == "empirical" and is_causal_lm(model)
    device = model_device(model)
    sums = KroneckerSums(layers, device, full_g)
    current: dict[str, Any] = {}  # the batch being passed (its attention mask picks the real tokens)

    def on_forward(name: str, module: nn.Module, a: torch.Tensor, output: torch.Tensor) -> None:
        sums.observe(current["batch"], name, module, a, output)

    bar = example_progress(max_examples, "K-FAC statistics")
    check_supported(layers)
    with (
        curvature_mode(model, double_backward=False),
        torch.enable_grad(),
        requires_grad(model.parameters(), False),  # no weight gradient, no input saved for one
        layer_hooks(layers, on_forward, leaf_inputs=True),  # δ reaches the first layer too
        bar,
    ):
        for batch in batches:
            if sums.examples >= max_examples:
                break
            batch = with_decoder_inputs(model, batch)
            current["batch"] = batch
            logits = logits_of(model(**model_inputs(batch, device))).float()
            n = logits.shape[0]
            if labels == "empirical":
                targets = fisher_targets(batch, logits, labels, likelihood, None)
                loss = example_losses(batch, logits, targets, likelihood, shift).sum()
            else:  # Σ_n nll_n (sequence outputs: nll_n is the example's loss; token outputs: per-token mean × n)
                targets = likelihood.sample(logits.detach(), generator=generator)
                loss = likelihood.nll(logits, targets, valid_rows(batch, logits)) * n
            if loss.requires_grad:  # δ = ∂loss/∂output, taken by the output hooks as the backward passes
                loss.backward()
            del logits, targets, loss
            sums.examples += n
            bar.update(n)
    return sums.averages(owners)


def _add_output_gradient(total: torch.Tensor, grad: torch.Tensor, conv: bool) -> None:
    """total += Σ_t δ_t δ_tᵀ (full G) or Σ_t δ_t² (diag G) over every position of one output gradient."""
    d = (conv_output_rows(grad) if conv else grad).detach().float()
    d = d.reshape(-1, d.shape[-1])
    total += d.T @ d if total.dim() == 2 else d.pow(2).sum(0)


def _input_rows(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """fp32 input rows (..., cols): a conv's patches at its output positions (N, L, ·)."""
    if isinstance(module, nn.Conv2d):
        if a.dim() != 4:
            raise CurvatureError(
                f"`curvature.init: kfac` needs batched (N, C, H, W) Conv2d inputs; got shape {tuple(a.shape)}"
            )
        return conv_patches(module, a)
    return a.float()


def _token_mask(
    batch: Mapping[str, Any], activations: torch.Tensor, device: torch.device, conv: bool = False
) -> torch.Tensor:
    """Bool over the activations' leading dims: real tokens only (padding carries no signal).

    A conv's (N, L) output positions are all real: an attention mask (text of a multimodal batch) never
    applies to them, even where its shape happens to be (N, L)."""
    lead = activations.shape[:-1]
    masks = [] if conv else [m.to(device).bool() for m in token_masks(batch) if tuple(m.shape) == tuple(lead)]
    if not masks:
        return torch.ones(lead, dtype=torch.bool, device=device)
    # An encoder-decoder whose source and target have the same length: the rows' stream is unknown from their
    # shape, so a row real in either counts (padding may slip in; no real token is dropped).
    return masks[0] if len(masks) == 1 else masks[0] | masks[1]

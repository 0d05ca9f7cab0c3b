"""Conv2d in the fast curvature paths (im2col, `fls_hf.model.patches`), against explicit computations:
hooked per-example gradients, K-FAC statistics ("KFC") and FishLeg's K-FAC warm start on a tiny conv net."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from fls_hf.curvature.fishleg import FishLegConfig, FishLegProvider
from fls_hf.errors import CurvatureError
from fls_hf.fisher.gradients import hooked_layers, per_example_gradients
from fls_hf.fisher.kronecker import kronecker_statistics
from fls_hf.fisher.likelihoods import Categorical
from fls_hf.model.adapters import adapter_for
from fls_hf.model.patches import conv_patches, plain_conv
from fls_hf.model.targets import resolve_targets

from helpers import tiny_bert, token_batches

CONVS = ("c1", "c2", "c3")
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's note on c3


class TinyConvNet(nn.Module):
    """2×7×7 images → 3 classes: padding, stride + dilation without bias, 'same' with an even kernel.

    `odd` makes c2 a conv the hooks cannot unfold (grouped, or reflect-padded): the loop fallback."""

    def __init__(self, odd: dict | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)  # 7×7 → 7×7
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=2, bias=False, **(odd or {}))  # → 4×4
        self.c3 = nn.Conv2d(4, 3, 2, padding="same")  # → 4×4, padded (0, 1) on each axis
        self.head = nn.Linear(48, 3)

    def stages(self, pixel_values):
        """Each conv's (input, output) and the logits, for the explicit computations."""
        h, seen = pixel_values, {}
        for name in CONVS:
            out = getattr(self, name)(h)
            seen[name], h = (h, out), torch.relu(out)
        seen["head"] = (h.flatten(1), self.head(h.flatten(1)))
        return seen

    def forward(self, pixel_values, labels=None, attention_mask=None):
        logits = self.stages(pixel_values)["head"][1]
        return SequenceClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


def layers_of(model):
    return {n: adapter_for(n, getattr(model, n)) for n in (*CONVS, "head")}


def image_batches(sizes=(5, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(b, 2, 7, 7, generator=g), "labels": torch.randint(0, 3, (b,), generator=g)}
        for b in sizes
    ]


def one_at_a_time(model, batch, layers):
    """Reference: ∂ℓ_n/∂W by `torch.autograd.grad` on each example alone, (b, rows, cols) per layer."""
    model.eval()
    out = {n: [] for n in layers}
    for i in range(batch["labels"].shape[0]):
        loss = model(pixel_values=batch["pixel_values"][i : i + 1], labels=batch["labels"][i : i + 1]).loss
        for (n, a), g in zip(layers.items(), torch.autograd.grad(loss, [a.weight for a in layers.values()])):
            out[n].append(a.to_matrix(g))
    return {n: torch.stack(gs) for n, gs in out.items()}


def gradients_and_forwards(model, batches, layers):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        return list(per_example_gradients(model, batches, layers, likelihood=Categorical())), len(calls)
    finally:
        handle.remove()


def test_patches_are_the_convolution_as_a_matrix_product():
    """conv(x) = patches @ W_matrixᵀ + b at every output position, for each conv of the net (odd 'same' included)."""
    model = TinyConvNet()
    x = image_batches()[0]["pixel_values"]
    for name, (inputs, out) in model.stages(x).items():
        if name == "head":
            continue
        conv = getattr(model, name)
        bias = 0 if conv.bias is None else conv.bias
        expected = out.flatten(2).transpose(1, 2)
        torch.testing.assert_close(
            conv_patches(conv, inputs) @ conv.weight.reshape(conv.out_channels, -1).T + bias, expected
        )


def test_plain_convs_take_the_hooked_path_and_match_autograd_per_example():
    model = TinyConvNet()
    layers, batches = layers_of(model), image_batches()
    assert hooked_layers(model, layers) == {*CONVS, "head"}
    got, forwards = gradients_and_forwards(model, batches, layers)
    assert forwards == len(batches)  # one batched pass each: no per-example loop
    for grads, batch in zip(got, batches):
        expected = one_at_a_time(model, batch, layers)
        for name in layers:
            assert grads[name].shape == expected[name].shape == (batch["labels"].shape[0], *layers[name].shape)
            torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("odd", [{"groups": 2}, {"padding_mode": "reflect"}], ids=["groups", "reflect"])
def test_convs_that_are_not_plain_loop_and_stay_correct(odd):
    model = TinyConvNet(odd)
    layers, batches = layers_of(model), image_batches()
    assert not plain_conv(model.c2) and hooked_layers(model, layers) == {"c1", "c3", "head"}
    got, forwards = gradients_and_forwards(model, batches, layers)
    assert forwards == sum(1 + b["labels"].shape[0] for b in batches)
    for grads, batch in zip(got, batches):
        expected = one_at_a_time(model, batch, layers)
        for name in layers:
            torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4)


def explicit_kfac(model, batches, seed):
    """KFC by hand: Ā = mean over (examples × positions) of [patch, 1][patch, 1]ᵀ (unfold written out: c3's
    'same' 2×2 kernel pads one zero row / column at the end), diag G = Σ_positions δ², mean over examples."""
    gen = torch.Generator().manual_seed(seed)
    a_sum = {n: 0 for n in (*CONVS, "head")}
    g_sum, rows, examples = dict(a_sum), dict(a_sum), 0
    model.eval()
    for batch in batches:
        x = batch["pixel_values"]
        labels = Categorical().sample(model(pixel_values=x).logits.detach(), generator=gen)  # the same draw, in order
        seen = model.stages(x)
        deltas = torch.autograd.grad(
            F.cross_entropy(seen["head"][1], labels, reduction="sum"), [out for _, out in seen.values()]
        )
        patches = {
            "c1": F.unfold(seen["c1"][0], 3, padding=1),
            "c2": F.unfold(seen["c2"][0], 3, dilation=2, padding=2, stride=2),
            "c3": F.unfold(F.pad(seen["c3"][0], (0, 1, 0, 1)), 2),
        }
        for name, delta in zip(seen, deltas):
            if name == "head":
                a, d = seen["head"][0], delta
            else:
                a, d = (
                    patches[name].transpose(1, 2).reshape(-1, patches[name].shape[1]),
                    delta.permute(0, 2, 3, 1).reshape(-1, delta.shape[1]),
                )
            a = torch.cat([a, torch.ones(a.shape[0], 1)], 1).detach()
            a_sum[name] = a_sum[name] + a.T @ a
            g_sum[name] = g_sum[name] + d.pow(2).sum(0)
            rows[name] += a.shape[0]
        examples += x.shape[0]
    return {n: (a_sum[n] / rows[n], g_sum[n] / examples) for n in a_sum}, rows


def test_kfac_statistics_of_convs_match_an_explicit_computation():
    model, batches = TinyConvNet(), image_batches((5, 3))
    stats = kronecker_statistics(
        model, batches, layers_of(model), Categorical(), generator=torch.Generator().manual_seed(3)
    )
    expected, rows = explicit_kfac(model, batches, seed=3)
    assert rows == {"c1": 8 * 49, "c2": 8 * 16, "c3": 8 * 16, "head": 8}  # positions are the conv's "tokens"
    for name, (a_bar, g) in expected.items():
        cols = layers_of(model)[name].shape[1]
        assert stats[name][0].shape == (cols + 1, cols + 1) and stats[name][1].shape == (
            layers_of(model)[name].shape[0],
        )
        torch.testing.assert_close(stats[name][0], a_bar)
        torch.testing.assert_close(stats[name][1], g)
        assert stats[name][0][-1, -1] == pytest.approx(1.0)  # the ones column, also for the bias-free c2


def test_attention_mask_never_masks_conv_positions():
    """A (N, L)-shaped mask (text beside images) must not drop conv positions, even when L matches."""
    model, batch = TinyConvNet(), image_batches((4,))[0]
    mask = torch.ones(4, 49, dtype=torch.long)
    mask[:, 20:] = 0  # c1 has 7 × 7 = 49 output positions
    plain = kronecker_statistics(
        model, [batch], layers_of(model), Categorical(), generator=torch.Generator().manual_seed(0)
    )
    masked = kronecker_statistics(
        model,
        [{**batch, "attention_mask": mask}],
        layers_of(model),
        Categorical(),
        generator=torch.Generator().manual_seed(0),
    )
    for name in plain:
        torch.testing.assert_close(masked[name][0], plain[name][0], atol=0, rtol=0)


def test_kfac_statistics_mix_token_and_pooled_layers():
    """Each layer counts its own rows: BERT's classifier (one pooled row per example) beside token layers."""
    model = tiny_bert()
    layers = resolve_targets(model, ["bert.encoder.layer.0.attention.self.query", "classifier"])
    stats = kronecker_statistics(
        model, token_batches(n_batches=1), layers, Categorical(), generator=torch.Generator().manual_seed(0)
    )
    for name in layers:
        assert stats[name][0][-1, -1] == pytest.approx(1.0) and (stats[name][1] > 0).all()


@pytest.mark.parametrize("structure", ["diagonal", "block_diagonal", "kronecker"])
def test_fishleg_kfac_warm_start_on_a_conv_net(structure):
    model, batches = TinyConvNet(), image_batches((5, 3))
    layers = layers_of(model)
    config = FishLegConfig(
        damping=1e-6, init="kfac", warmup_steps=0, structure=structure, block_size=4, init_examples=8
    )
    provider = FishLegProvider(layers, config, likelihood=Categorical())
    provider.ready(model, batches)
    stats = kronecker_statistics(
        model, batches, layers, Categorical(), generator=torch.Generator().manual_seed(config.seed), max_examples=8
    )
    for name, adapter in layers.items():
        d = provider.diag(name)
        assert d.shape == adapter.shape and torch.isfinite(d).all() and (d > 0).all()
        if structure == "diagonal":  # Q = diag 1/(G_ii Ā_jj + γ), the same sampled labels
            a_bar, g = stats[name]
            expected = 1 / (torch.outer(g, torch.diagonal(a_bar)[:-1]) + 1e-6)
            torch.testing.assert_close(d, expected.clamp_min(1e-12 / 1e-6), rtol=1e-4, atol=0)


def test_kfac_refuses_a_grouped_conv_by_name():
    model = TinyConvNet({"groups": 2})
    provider = FishLegProvider(
        layers_of(model), FishLegConfig(damping=1e-6, init="kfac", warmup_steps=0), likelihood=Categorical()
    )
    with pytest.raises(CurvatureError, match=r"`c2` has groups=2"):
        provider.ready(model, image_batches())
    assert all(not m._forward_hooks for m in model.modules())

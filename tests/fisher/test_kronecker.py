"""fls_hf.fisher.kronecker and the structures' K-FAC initialisation, against explicit computations."""

import math

import pytest
import torch
from torch import nn

from fls_hf.curvature.fishleg import FishLegConfig, FishLegProvider
from fls_hf.curvature.fishleg.structures import BlockDiagonalQ, DiagonalQ, KroneckerQ
from fls_hf.fisher.kronecker import kronecker_statistics
from fls_hf.fisher.likelihoods import Categorical
from fls_hf.model.adapters import adapter_for
from fls_hf.model.targets import resolve_targets

from helpers import MLP, tiny_bert, token_batches


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = MLP((5, 4, 3))

    def forward(self, x):
        return self.net(x)


def test_statistics_match_explicit_sampled_label_pass():
    model = Wrapped()
    x = torch.randn(6, 5)
    layer = model.net[2]  # second Linear: inputs are tanh activations
    layers = {"net.2": adapter_for("net.2", layer)}
    a_bar, g = kronecker_statistics(
        model, [{"x": x}], layers, Categorical(), generator=torch.Generator().manual_seed(3)
    )["net.2"]

    labels = Categorical().sample(model(x).detach(), generator=torch.Generator().manual_seed(3))
    hidden = torch.tanh(model.net[0](x))
    out = layer(hidden)
    delta = torch.autograd.grad(nn.functional.cross_entropy(out, labels, reduction="sum"), out)[0]
    a1 = torch.cat([hidden, torch.ones(6, 1)], 1).detach()
    torch.testing.assert_close(a_bar, a1.T @ a1 / 6)
    torch.testing.assert_close(g, delta.pow(2).mean(0))


def test_empirical_statistics_use_the_data_labels():
    model = Wrapped()
    x, y = torch.randn(6, 5), torch.tensor([0, 2, 1, 1, 0, 2])
    layer = model.net[2]
    layers = {"net.2": adapter_for("net.2", layer)}
    a_bar, g = kronecker_statistics(model, [{"x": x, "labels": y}], layers, Categorical(), labels="empirical")["net.2"]
    out = layer(torch.tanh(model.net[0](x)))
    delta = torch.autograd.grad(nn.functional.cross_entropy(out, y, reduction="sum"), out)[0]
    torch.testing.assert_close(g, delta.pow(2).mean(0))
    sampled = kronecker_statistics(model, [{"x": x}], layers, Categorical(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a_bar, sampled["net.2"][0])  # the input side does not depend on the labels


def test_empirical_statistics_of_a_causal_lm_score_the_next_token():
    from helpers import tiny_gpt2

    model = tiny_gpt2()
    batch = token_batches(n_batches=1)[0]
    batch = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}
    name = "transformer.h.0.mlp.c_proj"
    layers = resolve_targets(model, [name])
    _, g = kronecker_statistics(model, [batch], layers, Categorical(), full_g={name}, labels="empirical")[name]
    store = {}
    model.eval()  # as curvature_mode: no dropout
    handle = model.transformer.h[0].mlp.c_proj.register_forward_hook(lambda m, i, o: store.update(out=o))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    handle.remove()
    n = logits.shape[0]
    losses = [nn.functional.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=-100) for i in range(n)]
    delta = torch.autograd.grad(torch.stack(losses).sum(), store["out"])[0].reshape(-1, store["out"].shape[-1])
    torch.testing.assert_close(g, delta.T @ delta / n, rtol=1e-4, atol=1e-7)


def test_padding_tokens_are_left_out_of_the_input_covariance():
    model = tiny_bert()
    layers = resolve_targets(model, ["bert.encoder.layer.0.attention.self.query"])
    batch = token_batches(n_batches=1)[0]
    a_bar, g = kronecker_statistics(model, [batch], layers, Categorical(), generator=torch.Generator().manual_seed(0))[
        "bert.encoder.layer.0.attention.self.query"
    ]
    assert a_bar[-1, -1] == pytest.approx(1.0)  # the bias column's second moment: exactly 1 over real tokens
    assert (g > 0).all()


def stats(rows=3, cols=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(20, cols + 1, generator=gen)
    a[:, -1] = 1.0
    return a.T @ a / 20, torch.rand(rows, generator=gen) + 0.1


def explicit(structure):
    rows, cols = structure.shape
    eye = torch.eye(rows * cols)
    with torch.no_grad():
        return torch.stack([structure.matvec(e.view(rows, cols)).reshape(-1) for e in eye], 1)


def test_diagonal_init_is_kfac_fisher_diagonal():
    a_bar, g = stats()
    s = DiagonalQ(3, 6, 0.1)
    s.init_kfac(a_bar, g, 0.1)
    with torch.no_grad():
        torch.testing.assert_close(s.diag(), 1 / (torch.outer(g, torch.diagonal(a_bar)[:6]) + 0.1))


@pytest.mark.parametrize("block", [3, 4])
def test_block_init_inverts_kfac_blocks(block):
    a_bar, g = stats()
    s = BlockDiagonalQ(3, 6, 0.1, block)
    s.init_kfac(a_bar, g, 0.1)
    q = explicit(s)
    for i in range(3):
        for start in range(0, 6, block):
            idx = list(range(start, min(start + block, 6)))
            want = torch.linalg.inv(g[i] * a_bar[idx][:, idx] + 0.1 * torch.eye(len(idx)))
            got = q[[i * 6 + j for j in idx]][:, [i * 6 + j for j in idx]]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_kronecker_init_is_factored_damped_kfac_inverse():
    a_bar, g = stats()
    s = KroneckerQ(3, 7, 0.1)  # models the bias column
    s.init_kfac(a_bar, g, 0.1)
    pi = math.sqrt(float(torch.diagonal(a_bar).mean() / g.mean()))
    left = torch.diag(1 / (g + pi * math.sqrt(0.1)))
    right = torch.linalg.inv(a_bar + math.sqrt(0.1) / pi * torch.eye(7))
    torch.testing.assert_close(explicit(s), torch.kron(left, right.contiguous()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("structure", ["diagonal", "block_diagonal", "kronecker"])
def test_provider_kfac_init_on_tiny_bert(structure):
    """A freshly initialised BERT has a tiny Fisher: a tiny damping lets the statistics show in Q."""
    model = tiny_bert()
    layers = resolve_targets(model, ["re:.*encoder\\.layer\\.0\\..*(query|dense)$"])
    provider = FishLegProvider(
        layers, FishLegConfig(damping=1e-9, init="kfac", warmup_steps=0, structure=structure, block_size=4)
    )
    before = {n: provider.diag(n).clone() for n in layers}
    provider.ready(model, token_batches(n_batches=2))
    for name in layers:
        d = provider.diag(name)
        assert torch.isfinite(d).all() and (d > 0).all() and not torch.equal(d, before[name])


def test_layers_fed_one_tensor_share_their_kfac_eigenbasis():
    """Query, key and value read the same hidden states: their Ā is the same (exactly the explicit one over real
    tokens) and K-FAC decomposes it once; the attention output, of the same shape but fed another tensor, keeps its
    own."""
    from fls_hf.curvature.kfac import KFACConfig, KFACProvider

    model = tiny_bert()
    layers = resolve_targets(model, ["re:.*encoder\\.layer\\.\\d+\\..*(query|key|value|dense)$"])
    batches = token_batches(n_batches=2)
    store = []
    block = model.bert.encoder.layer[1].attention
    handle = block.self.query.register_forward_hook(lambda m, i, o: store.append(i[0].detach()))
    provider = KFACProvider(layers, KFACConfig(num_examples=64, damping=1e-3, max_full_g_rows=0))
    provider.ready(model, batches)
    handle.remove()
    prefix = "bert.encoder.layer.1.attention."
    query, key, value, out = (prefix + s for s in ("self.query", "self.key", "self.value", "output.dense"))
    hidden = torch.cat([h[b["attention_mask"].bool()] for h, b in zip(store, batches)])
    a1 = torch.cat([hidden, torch.ones(len(hidden), 1)], 1)
    torch.testing.assert_close(provider.a_bar[key], (a1.T @ a1 / len(a1))[:-1, :-1])
    assert torch.equal(provider.a_bar[query], provider.a_bar[key]) and torch.equal(
        provider.a_bar[key], provider.a_bar[value]
    )
    models = {n: provider.row_model(n) for n in (query, key, value, out)}
    assert models[query].basis is models[key].basis is models[value].basis
    assert models[out].basis is not models[value].basis
    assert not torch.equal(provider.a_bar[out], provider.a_bar[value])

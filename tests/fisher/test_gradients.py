"""fls_hf.fisher.gradients: per-example gradients equal a batch-size-1 autograd loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fls_hf.errors import CurvatureError
from fls_hf.fisher.gradients import per_example_gradients
from fls_hf.fisher.likelihoods import Categorical
from fls_hf.model.adapters import adapter_for
from fls_hf.model.targets import resolve_targets

from helpers import mlp_problem, tiny_bert, tiny_gpt2, token_batches


class ConvNet(nn.Module):
    """Conv2d (hooked, im2col) followed by a Linear (hooked)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(12, 4)

    def forward(self, pixel_values):
        return self.head(torch.tanh(self.conv(pixel_values)).flatten(1))


def mlp_case():
    return mlp_problem(2)


def conv_case():
    model = ConvNet()
    g = torch.Generator().manual_seed(1)
    batches = [{"pixel_values": torch.randn(3, 2, 4, 4, generator=g), "labels": torch.randint(0, 4, (3,), generator=g)}]
    return model, batches, {n: adapter_for(n, getattr(model, n)) for n in ("conv", "head")}


def cross_entropy(model, batch):
    return F.cross_entropy(model(*[v for k, v in batch.items() if k != "labels"]), batch["labels"])


def hf_loss(model, batch):
    """The model's own loss: mean over valid (shifted, for causal LMs) positions of the one example."""
    return model(**batch).loss


def loop_gradients(model, batch, layers, loss_fn):
    """Reference: one forward/backward per example, (b, rows, cols) per layer."""
    model.eval()
    size = batch["labels"].shape[0]
    out = {n: [] for n in layers}
    for i in range(size):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss_fn(model, one), [a.weight for a in layers.values()])
        for (n, a), g in zip(layers.items(), grads):
            out[n].append(a.to_matrix(g))
    return {n: torch.stack(gs) for n, gs in out.items()}


def assert_matches_loop(model, batches, layers, loss_fn, looped=False):
    """`looped`: some layer needs the batch-size-1 fallback (1 + b forwards per batch), else one forward."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        got = list(per_example_gradients(model, batches, layers, likelihood=Categorical()))
    finally:
        handle.remove()
    assert len(got) == len(batches)
    assert len(calls) == sum(1 + (b["labels"].shape[0] if looped else 0) for b in batches)
    for grads, batch in zip(got, batches):
        expected = loop_gradients(model, batch, layers, loss_fn)
        for name in layers:
            assert grads[name].shape == expected[name].shape
            torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case,looped", [(mlp_case, False), (conv_case, False)], ids=["mlp", "conv2d"])
def test_small_models_match_loop(case, looped):
    model, batches, layers = case()
    assert_matches_loop(model, batches, layers, cross_entropy, looped)


def test_tiny_bert_sequence_classification_matches_loop():
    model = tiny_bert()
    layers = resolve_targets(model, ["re:.*encoder\\.layer\\.\\d+\\..*(query|value|dense)$"])
    assert_matches_loop(model, token_batches(n_batches=1), layers, hf_loss)


def gpt2_batch():
    batch = token_batches(n_batches=1)[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def test_tiny_gpt2_causal_lm_with_padding_matches_loop():
    """Conv1D layers (hooked, transposed matrix view) and the tied lm_head (shared weight: loop fallback)."""
    model = tiny_gpt2()
    layers = resolve_targets(model, ["re:.*h\\.0\\..*(c_attn|c_proj|c_fc)$", "lm_head"])
    assert layers["transformer.h.0.attn.c_attn"].shape == (48, 16)
    assert_matches_loop(model, [gpt2_batch()], layers, hf_loss, looped=True)
    del layers["lm_head"]
    assert_matches_loop(model, [gpt2_batch()], layers, hf_loss)


def test_sampled_labels_are_a_seeded_draw_from_the_model():
    model = tiny_bert()
    layers = resolve_targets(model, ["re:.*layer\\.1\\..*query$", "classifier"])
    batch = token_batches(n_batches=1)[0]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    draws = Categorical().sample(logits, generator=torch.Generator().manual_seed(3))

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return next(
            per_example_gradients(model, [batch], layers, labels="sampled", likelihood=Categorical(), generator=gen)
        )

    first, again, other = run(3), run(3), run(4)
    expected = next(per_example_gradients(model, [{**batch, "labels": draws}], layers, likelihood=Categorical()))
    for name in layers:
        torch.testing.assert_close(first[name], again[name], atol=0, rtol=0)
        torch.testing.assert_close(first[name], expected[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(first[n], other[n]) for n in layers)


def test_leaves_grads_mode_hooks_and_frozen_flags_alone():
    model, batches, layers = mlp_case()
    model.train()
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    model[2].weight.requires_grad_(False)
    with torch.no_grad():
        grads = list(per_example_gradients(model, batches, layers, likelihood=Categorical()))
    assert grads[0]["2"].abs().sum() > 0
    assert all(torch.equal(p.grad, sentinel[n]) for n, p in model.named_parameters())
    assert model.training and not model[2].weight.requires_grad
    assert all(not m._forward_hooks for m in model.modules())


def test_max_examples_cuts_the_last_batch_and_keep_masks():
    model, batches, layers = mlp_case()
    keep = {"0": torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) > 0.5}
    got = list(
        per_example_gradients(model, iter(batches * 100), layers, likelihood=Categorical(), max_examples=6, keep=keep)
    )
    assert [g["0"].shape[0] for g in got] == [4, 2]
    full = next(per_example_gradients(model, batches, layers, likelihood=Categorical()))
    torch.testing.assert_close(got[0]["0"], full["0"] * keep["0"])
    assert (got[1]["0"][:, ~keep["0"]] == 0).all() and torch.equal(got[0]["2"], full["2"])


def test_empirical_labels_are_required():
    model, batches, layers = mlp_case()
    with pytest.raises(CurvatureError, match="fisher_labels"):
        next(per_example_gradients(model, [{"input": batches[0]["input"]}], layers, likelihood=Categorical()))
    with pytest.raises(CurvatureError, match="allowed: empirical, sampled"):
        next(per_example_gradients(model, batches, layers, labels="true", likelihood=Categorical()))


def test_expected_labels_give_the_exact_true_fisher():
    """Mean of g gᵀ over the √(C p_c)-scaled class passes = (1/b) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n, explicitly."""
    model, batches, layers = mlp_case()
    model.eval()
    batch = {k: v[:3] for k, v in batches[0].items()}  # 3 examples × 3 classes = 9 vectors, asked for 8
    vectors = [
        g["0"].reshape(g["0"].shape[0], -1)
        for g in per_example_gradients(
            model, [batch], {"0": layers["0"]}, labels="expected", likelihood=Categorical(), max_examples=8
        )
    ]
    g = torch.cat(vectors)
    assert g.shape[0] == 9  # the cut keeps whole examples: all 3 class passes see the same 3 inputs
    fisher = g.T @ g / g.shape[0]

    weight = layers["0"].weight
    exact = torch.zeros(weight.numel(), weight.numel())
    for x in batch["input"]:

        def logits(w, x=x):
            return torch.func.functional_call(model, {"0.weight": w}, (x[None],))[0]

        jac = torch.func.jacrev(logits)(weight.detach()).reshape(3, -1)
        p = torch.softmax(logits(weight.detach()), -1)
        exact += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / 3
    torch.testing.assert_close(fisher, exact, rtol=1e-4, atol=1e-6)


def test_expected_labels_refuse_token_outputs():
    model = tiny_gpt2()
    layers = resolve_targets(model, ["c_attn"])
    batch = next(iter(token_batches(1, num_labels=2)))
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with pytest.raises(CurvatureError, match=r"fisher_labels` = 'expected'.*use 'sampled'"):
        next(per_example_gradients(model, [batch], layers, labels="expected", likelihood=Categorical()))

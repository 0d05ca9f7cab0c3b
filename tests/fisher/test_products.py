"""fls_hf.fisher.products: GGN and sampled-label HVP products against F built from explicit Jacobians."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from fls_hf.fisher.likelihoods import Bernoulli, Categorical, Gaussian
from fls_hf.fisher.products import ggn_product, hvp_product
from fls_hf.model.forward import valid_rows

from helpers import MLP, tiny_gpt2, token_batches


class Wrapped(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def output_hessian(likelihood, logits_row):
    if isinstance(likelihood, Categorical):
        p = torch.softmax(logits_row, -1)
        return torch.diag(p) - torch.outer(p, p)
    if isinstance(likelihood, Bernoulli):
        s = torch.sigmoid(logits_row)
        return torch.diag(s * (1 - s))
    return torch.eye(logits_row.numel()) / likelihood.sigma**2


def explicit_fisher(model, batch, names, likelihood):
    """F = (1/N_valid) Σ_valid-rows J_rowᵀ H_out J_row, over the flattened parameters `names`."""
    params = dict(model.named_parameters())
    theta = {n: params[n].detach() for n in names}
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def logits_fn(sub):
        out = functional_call(model, {**params, **sub}, args=(), kwargs=inputs)
        return out if isinstance(out, torch.Tensor) else out.logits

    with torch.no_grad():
        logits = logits_fn(theta)
    jac = jacrev(logits_fn)(theta)
    c = logits.shape[-1]
    rows = logits.reshape(-1, c)
    j = torch.cat([jac[n].reshape(rows.shape[0], c, -1) for n in names], dim=-1)  # (rows, C, P)
    valid = valid_rows(batch, logits).reshape(-1)
    f = sum(j[r].T @ output_hessian(likelihood, rows[r]) @ j[r] for r in range(rows.shape[0]) if valid[r])
    return f / valid.sum()


@pytest.mark.parametrize("likelihood", [Categorical(), Bernoulli(), Gaussian(sigma=0.5)], ids=lambda lik: lik.name)
def test_ggn_product_equals_explicit_fisher_mlp(likelihood):
    model = Wrapped(MLP((6, 5, 3)))
    model.eval()
    batch = {"x": torch.randn(7, 6)}
    names = ["net.0.weight", "net.0.bias", "net.2.weight"]
    params = dict(model.named_parameters())
    f = explicit_fisher(model, batch, names, likelihood)
    v = {params[n]: torch.randn(params[n].shape) for n in names}
    got = torch.cat([t.reshape(-1) for t in ggn_product(model, batch, v, likelihood)])
    want = f @ torch.cat([t.reshape(-1) for t in v.values()])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ggn_product_token_level_respects_attention_mask():
    model = tiny_gpt2()
    batch = token_batches(n_batches=1, batch_size=2, seq_len=5)[0]
    del batch["labels"]
    name = "transformer.h.0.mlp.c_proj.weight"
    param = dict(model.named_parameters())[name]
    model.eval()  # the explicit reference must not see dropout either
    f = explicit_fisher(model, batch, [name], Categorical())
    model.train()
    v = torch.randn(param.shape)
    got = ggn_product(model, batch, {param: v}, Categorical())[0].reshape(-1)
    torch.testing.assert_close(got, f @ v.reshape(-1), rtol=1e-4, atol=1e-6)
    assert model.training  # mode restored


def test_sampled_label_hvp_is_unbiased_for_fisher():
    torch.manual_seed(0)
    model = Wrapped(MLP((4, 3)))
    batch = {"x": torch.randn(64, 4)}
    param = model.net[0].weight
    v = torch.randn(param.shape)
    f = explicit_fisher(model, batch, ["net.0.weight"], Categorical())
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([hvp_product(model, batch, {param: v}, Categorical(), generator=g)[0] for _ in range(200)])
    want = f @ v.reshape(-1)
    err = (draws.mean(0).reshape(-1) - want).norm() / want.norm()
    assert err < 0.05


def test_products_leave_param_grad_untouched():
    model = Wrapped(MLP((4, 3)))
    model.net[0].weight.grad = torch.full_like(model.net[0].weight, 7.0)
    ggn_product(model, {"x": torch.randn(3, 4)}, {model.net[0].weight: torch.ones(3, 4)}, Categorical())
    assert torch.equal(model.net[0].weight.grad, torch.full((3, 4), 7.0))

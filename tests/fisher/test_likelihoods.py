"""fls_hf.fisher.likelihoods: H_out products, NLLs and samples against explicit matrices; `auto` resolution."""

import pytest
import torch
from transformers import BertConfig

from fls_hf.fisher.likelihoods import Bernoulli, Categorical, Gaussian, likelihood_for

# (batch 2, positions 3, outputs 4); rows (0, 2) and (1, 0) are invalid (padding / -100 labels)
LOGITS = torch.tensor(
    [
        [[0.5, -1.0, 2.0, 0.0], [1.5, 0.3, -0.7, 0.2], [-2.0, 1.0, 0.1, 0.4]],
        [[0.0, 0.0, 3.0, -1.0], [0.9, -0.4, 0.6, 1.2], [-0.3, 2.2, -1.1, 0.8]],
    ]
)
TANGENT = torch.tensor(
    [
        [[1.0, 2.0, -1.0, 0.5], [0.0, -1.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0]],
        [[-1.0, 0.5, 0.0, 1.0], [1.0, 1.0, -2.0, 0.0], [0.3, -0.7, 1.1, -2.0]],
    ]
)
VALID = torch.tensor([[True, True, False], [False, True, True]])
N_VALID = 4


def explicit_h_out(likelihood, row):
    """The output-space Fisher of one logits row, written out as a matrix."""
    if isinstance(likelihood, Categorical):
        p = torch.exp(row) / torch.exp(row).sum()
        return torch.diag(p) - torch.outer(p, p)
    if isinstance(likelihood, Bernoulli):
        s = 1 / (1 + torch.exp(-row))
        return torch.diag(s * (1 - s))
    return torch.eye(row.numel()) / likelihood.sigma**2


@pytest.mark.parametrize(
    "likelihood",
    [Categorical(), Bernoulli(), Gaussian(), Gaussian(sigma=2.0)],
    ids=["categorical", "bernoulli", "gaussian", "gaussian_sigma2"],
)
def test_fisher_product_is_h_out_times_tangent_over_valid_rows(likelihood):
    expected = torch.zeros_like(TANGENT)
    for b in range(2):
        for t in range(3):
            if VALID[b, t]:
                expected[b, t] = explicit_h_out(likelihood, LOGITS[b, t]) @ TANGENT[b, t] / N_VALID
    product = likelihood.fisher_product(LOGITS, TANGENT, VALID)
    torch.testing.assert_close(product, expected)
    assert (product[~VALID] == 0).all()


def test_fisher_product_of_sequence_logits_averages_over_the_batch():
    """(batch, outputs) logits: every row is valid, H_out per row divided by the batch size."""
    logits, tangent = LOGITS[0], TANGENT[0]
    product = Categorical().fisher_product(logits, tangent, torch.ones(3, dtype=torch.bool))
    expected = torch.stack([explicit_h_out(Categorical(), logits[r]) @ tangent[r] for r in range(3)]) / 3
    torch.testing.assert_close(product, expected)


def test_categorical_nll_is_the_mean_cross_entropy_over_valid_rows():
    labels = torch.tensor([[2, 0, -100], [-100, 3, 1]])
    expected = torch.tensor(0.0)
    for b, t in VALID.nonzero().tolist():
        row = LOGITS[b, t]
        expected -= (row[labels[b, t]] - torch.exp(row).sum().log()) / N_VALID
    torch.testing.assert_close(Categorical().nll(LOGITS, labels, VALID), expected)


def test_bernoulli_nll_sums_outputs_and_averages_valid_rows():
    labels = torch.tensor([[[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], [[0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]]])
    expected = 0.0
    for b, t in VALID.nonzero().tolist():
        s = 1 / (1 + torch.exp(-LOGITS[b, t]))
        expected -= (labels[b, t] * torch.log(s) + (1 - labels[b, t]) * torch.log(1 - s)).sum() / N_VALID
    torch.testing.assert_close(Bernoulli().nll(LOGITS, labels, VALID), expected)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_nll_is_half_the_scaled_squared_error_over_valid_rows(sigma):
    """−log N(y; μ, σ²) up to its constant: ½ Σ_outputs ((y − μ)/σ)², averaged over valid rows."""
    labels = LOGITS + TANGENT
    expected = sum(0.5 * (TANGENT[b, t] ** 2).sum() / sigma**2 for b, t in VALID.nonzero().tolist()) / N_VALID
    torch.testing.assert_close(Gaussian(sigma).nll(LOGITS, labels, VALID), expected)


def test_nll_of_no_valid_row_is_zero():
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert Categorical().nll(LOGITS, torch.zeros(2, 3, dtype=torch.long), none) == 0
    assert Gaussian().nll(LOGITS, LOGITS + 1, none) == 0


DRAWS = 20000


def test_categorical_samples_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, -1.0, 0.0]])
    draws = Categorical().sample(logits.repeat(DRAWS, 1), generator=torch.Generator().manual_seed(0)).reshape(DRAWS, 2)
    assert draws.dtype == torch.long and draws.shape == (DRAWS, 2)
    frequencies = torch.stack([torch.bincount(draws[:, r], minlength=3) for r in range(2)]).float() / DRAWS
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    torch.testing.assert_close(frequencies, p, atol=0.02, rtol=0)


def test_bernoulli_samples_follow_the_sigmoid():
    logits = torch.tensor([-2.0, 0.0, 1.5])
    draws = Bernoulli().sample(logits.expand(DRAWS, 3), generator=torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(draws.mean(0), 1 / (1 + torch.exp(-logits)), atol=0.02, rtol=0)


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_gaussian_samples_are_centred_on_the_logits_with_spread_sigma(sigma):
    logits = torch.tensor([-1.0, 3.0])
    draws = Gaussian(sigma).sample(logits.expand(DRAWS, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.mean(0), logits, atol=0.03, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.full((2,), sigma), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "likelihood", [Categorical(), Bernoulli(), Gaussian()], ids=["categorical", "bernoulli", "gaussian"]
)
def test_samples_repeat_with_the_same_seed(likelihood):
    first, second = (likelihood.sample(LOGITS, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "config, name",
    [
        (None, "categorical"),
        (BertConfig(), "categorical"),  # num_labels 2
        (BertConfig(num_labels=5), "categorical"),
        (BertConfig(num_labels=1), "gaussian"),  # no problem_type and one label: regression, as transformers reads it
        (BertConfig(num_labels=3, problem_type="regression"), "gaussian"),
        (BertConfig(num_labels=4, problem_type="multi_label_classification"), "bernoulli"),
        (BertConfig(num_labels=3, problem_type="single_label_classification"), "categorical"),
    ],
    ids=["no_config", "default", "five_labels", "one_label", "regression", "multi_label", "single_label"],
)
def test_auto_reads_problem_type_and_num_labels(config, name):
    assert likelihood_for("auto", config).name == name


@pytest.mark.parametrize("name", ["categorical", "bernoulli", "gaussian"])
def test_an_explicit_name_overrides_the_config(name):
    assert likelihood_for(name, BertConfig(num_labels=1)).name == name

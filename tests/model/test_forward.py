"""fls_hf.model.forward.logits_of on every output form a model may return, and those forms end to end."""

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from fls_hf import FishLegPruningTrainer, oneshot, sparsity_report
from fls_hf.errors import CurvatureError
from fls_hf.model import logits_of

from helpers import token_batches
from test_trainer import dataset, training_args

LOGITS = torch.arange(6.0).reshape(2, 3)
LOSS = torch.tensor(0.5)


@pytest.mark.parametrize(
    "outputs",
    [
        LOGITS,
        SequenceClassifierOutput(loss=LOSS, logits=LOGITS),
        SequenceClassifierOutput(logits=LOGITS),
        {"loss": LOSS, "logits": LOGITS},
        {"logits": LOGITS},
        (LOGITS, torch.zeros(2, 4)),
        [LOGITS],
        namedtuple("Out", ["hidden", "logits"])(torch.zeros(2, 4), LOGITS),
    ],
    ids=[
        "tensor",
        "model_output",
        "model_output_no_loss",
        "dict",
        "dict_logits_only",
        "tuple",
        "list",
        "namedtuple_attribute",
    ],
)
def test_logits_of_reads_every_supported_form(outputs):
    assert logits_of(outputs) is LOGITS


@pytest.mark.parametrize(
    "outputs, found",
    [
        ({"loss": LOSS, "hidden": LOGITS}, r"dict with keys \['loss', 'hidden'\]"),
        ({"loss": LOSS, "logits": None}, r"dict with keys \['loss', 'logits'\]"),
        ((None, LOGITS), "tuple whose first element is NoneType"),
        ((), "returned tuple;"),
        (3.0, "returned float;"),
        (namedtuple("Out", ["logits"])([1.0]), "Out whose `logits` is list"),
    ],
    ids=[
        "dict_without_logits",
        "dict_logits_none",
        "tuple_first_none",
        "empty_tuple",
        "float",
        "logits_attribute_not_tensor",
    ],
)
def test_logits_of_names_what_came_back_and_what_is_expected(outputs, found):
    with pytest.raises(CurvatureError, match=found) as error:
        logits_of(outputs)
    assert "a tensor, a ModelOutput or dict with a `logits` tensor, or a tuple / list whose first element" in str(
        error.value
    )


class CustomClassifier(nn.Module):
    """A plain nn.Module (no config, no ModelOutput): embeds tokens, mean-pools, two hidden linears, a head."""

    def __init__(self, returns="dict", vocab=64, d=16, k=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.returns = returns
        self.embed = nn.Embedding(vocab, d)
        self.fc1, self.fc2, self.classifier = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, k)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = (self.embed(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        logits = self.classifier(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        if self.returns == "dict":
            return {"loss": loss, "logits": logits}
        if self.returns == "tuple":
            return (logits, h)
        return logits


ONESHOT_RECIPES = {
    "fishleg": {"pruning": {"method": "fishleg", "final_sparsity": 0.6}, "curvature": {"num_batches": 2}},
    "block_fisher": {
        "pruning": {"method": "block_fisher", "final_sparsity": 0.6},
        "curvature": {"num_grads": 8, "block_size": 8},
    },
    "diagonal_fisher": {"pruning": {"method": "diagonal_fisher", "final_sparsity": 0.6}, "curvature": {"num_grads": 8}},
}


def assert_exact_target(model, report, sparsity):
    assert [layer.name for layer in report.layers] == ["fc1", "fc2"]  # the `classifier` head is ignored by default
    assert report.zeros == round(sparsity * report.numel)
    assert sum(int((getattr(model, layer.name).weight == 0).sum()) for layer in report.layers) == report.zeros
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", sorted(ONESHOT_RECIPES))
def test_oneshot_on_a_model_returning_a_dict(method):
    model = CustomClassifier("dict")
    report = oneshot(model, token_batches(n_batches=2), ONESHOT_RECIPES[method])
    assert_exact_target(model, report, 0.6)


@pytest.mark.parametrize("returns", ["tuple", "tensor"])
def test_oneshot_on_a_model_returning_a_tuple_or_a_tensor(returns):
    model = CustomClassifier(returns)
    report = oneshot(model, token_batches(n_batches=2), ONESHOT_RECIPES["fishleg"])
    assert_exact_target(model, report, 0.6)


def test_oneshot_error_on_an_unreadable_output_names_it():
    class HiddenOnly(CustomClassifier):
        def forward(self, **batch):
            return {"loss": None, "hidden": super().forward(**batch)["logits"]}

    with pytest.raises(CurvatureError, match=r"dict with keys \['loss', 'hidden'\]"):
        oneshot(HiddenOnly(), token_batches(n_batches=2), ONESHOT_RECIPES["fishleg"])


def test_trainer_on_a_model_returning_a_dict(tmp_path):
    recipe = {
        "pruning": {
            "method": "fishleg",
            "init_sparsity": 0.3,
            "final_sparsity": 0.7,
            "start_step": 0,
            "end_step": 2,
            "update_frequency": 2,
        },
        "curvature": {"num_batches": 2, "warmup_steps": 5, "refinement_steps": 2},
    }
    model = CustomClassifier("dict")
    trainer = FishLegPruningTrainer(
        model=model, args=training_args(tmp_path, max_steps=4), recipe=recipe, train_dataset=dataset(32)
    )
    trainer.train()
    report = sparsity_report(model, trainer.recipe)
    assert_exact_target(model, report, 0.7)

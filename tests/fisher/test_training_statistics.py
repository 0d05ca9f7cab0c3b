"""K-FAC statistics from the training steps (`curvature.statistics: training`) against the empirical-label pass."""

import pytest
import torch

from fls_hf.fisher.kronecker import kronecker_statistics
from fls_hf.fisher.likelihoods import Categorical
from fls_hf.fisher.training import TrainingStatistics
from fls_hf.model.targets import resolve_targets

from helpers import tiny_bert, token_batches

TARGETS = ["re:.*encoder\\.layer\\.\\d+\\..*(query|value|dense)$"]
FULL_G = "bert.encoder.layer.1.output.dense"


def test_window_equals_the_empirical_pass_on_the_same_batches():
    """Without dropout a training step's forward is the pass's: Ā is the same, and G after undoing the mean over the
    step's examples and the loss scale. A skipped step and an evaluation forward inside the window add nothing."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    layers = resolve_targets(model, TARGETS)
    batches = token_batches(n_batches=4, batch_size=4)
    stats = TrainingStatistics(layers, full_g={FULL_G})
    stats.attach(model)
    model.train()
    for batch, scale in ((batches[0], None), (batches[1], 8.0)):  # the second as fp16's GradScaler would scale it
        (model(**batch).loss * (scale or 1.0)).backward()
        stats.end_step(skipped=False, loss_scale=scale)
    model.eval()
    with torch.no_grad():
        model(**batches[2])
    model.train()
    (model(**batches[3]).loss * 1e6).backward()
    stats.end_step(skipped=True, loss_scale=None)
    stats.detach()
    model(**batches[3]).loss.backward()  # after detach: not seen
    assert stats.steps == 2
    got = stats.averages()
    model.zero_grad()
    want = kronecker_statistics(
        model, batches[:2], layers, Categorical(), max_examples=8, full_g={FULL_G}, labels="empirical"
    )
    assert set(got) == set(want) == set(layers)
    for name, (a_bar, g) in want.items():
        torch.testing.assert_close(got[name][0], a_bar, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[name][1], g, rtol=1e-4, atol=1e-10)
        assert g.dim() == (2 if name == FULL_G else 1) and bool(g.any())


def test_reset_empties_the_window_and_hooks_leave_with_detach():
    model = tiny_bert()
    layers = resolve_targets(model, TARGETS)
    stats = TrainingStatistics(layers)
    stats.attach(model)
    stats.attach(model)  # idempotent
    model.train()
    model(**token_batches(n_batches=1)[0]).loss.backward()
    stats.end_step(skipped=False, loss_scale=None)
    stats.reset()
    assert stats.steps == 0 and stats.window.examples == 0
    assert all(not bool(a.any()) for a in stats.window.a.values())
    stats.detach()
    assert not stats.attached
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(Exception, match="empty calibration"):
        stats.averages()

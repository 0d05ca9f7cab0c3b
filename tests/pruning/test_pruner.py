"""fls_hf.pruning.pruner: state save / load without pickle, refusal of missing, truncated or pickled state."""

import pickle

import pytest
import torch

from fls_hf.errors import PruningStateError
from fls_hf.pruning.pruner import STATE_TENSORS, Pruner

from helpers import tiny_bert, token_batches

RECIPE = {
    "pruning": {"method": "fishleg", "final_sparsity": 0.5, "obs_block_size": 8},
    "curvature": {"damping": 1e-3, "num_batches": 2, "warmup_steps": 3, "block_size": 8},
}


def pruned(tmp_path=None):
    model = tiny_bert()
    pruner = Pruner(model, RECIPE)
    pruner.prune_to(model, 0.5, token_batches(n_batches=2))
    return model, pruner


def test_state_round_trip_restores_masks_and_curvature(tmp_path):
    model, pruner = pruned()
    pruner.save(tmp_path)
    fresh = Pruner(tiny_bert(), RECIPE)
    fresh.load(tmp_path)
    assert fresh.masks.digest() == pruner.masks.digest()
    assert fresh.current_target == 0.5 and fresh.provider.prepared
    for key, value in pruner.provider.state_tensors().items():
        assert torch.equal(fresh.provider.state_tensors()[key], value), key
    # loading enforces the masks on the (unpruned) fresh model's weights
    assert fresh.masks.global_sparsity() == pytest.approx(0.5)
    for name, adapter in fresh.layers.items():
        assert (
            torch.equal(adapter.weight == 0, ~fresh.masks.keep(name))
            or (adapter.weight[~fresh.masks.keep(name)] == 0).all()
        )


@pytest.mark.bad_input
def test_missing_state_is_reported(tmp_path):
    with pytest.raises(PruningStateError, match="no pruner state"):
        Pruner(tiny_bert(), RECIPE).load(tmp_path)


@pytest.mark.bad_input
def test_truncated_state_is_reported(tmp_path):
    _, pruner = pruned()
    pruner.save(tmp_path)
    data = (tmp_path / STATE_TENSORS).read_bytes()
    (tmp_path / STATE_TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(PruningStateError, match="unreadable or truncated"):
        Pruner(tiny_bert(), RECIPE).load(tmp_path)


@pytest.mark.malicious
def test_pickled_state_is_refused_and_never_executed(tmp_path):
    _, pruner = pruned()
    pruner.save(tmp_path)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / STATE_TENSORS).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(PruningStateError):
        Pruner(tiny_bert(), RECIPE).load(tmp_path)
    assert not marker.exists()


@pytest.mark.bad_input
def test_state_for_another_model_shape_is_refused(tmp_path):
    _, pruner = pruned()
    pruner.save(tmp_path)
    other = tiny_bert(intermediate_size=48)
    with pytest.raises(PruningStateError, match="intermediate"):
        Pruner(other, RECIPE).load(tmp_path)


def test_adopted_curvature_gives_the_same_pruning_as_estimating_it():
    direct_model, direct = pruned()
    model = tiny_bert()
    estimation_copy = tiny_bert()
    estimator = Pruner(estimation_copy, RECIPE)
    estimator.provider.ready(estimation_copy, token_batches(n_batches=2))
    adopted = Pruner(model, RECIPE)
    adopted.adopt_curvature(estimator.provider.state_dict())
    adopted.prune_to(model, 0.5, token_batches(n_batches=2))
    assert adopted.masks.digest() == direct.masks.digest()
    for a, b in zip(model.parameters(), direct_model.parameters()):
        torch.testing.assert_close(a, b)

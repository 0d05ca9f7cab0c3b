"""fls_hf.pruning.masks: in-place masks, optimizer interplay, bit-packed state, digest."""

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from transformers.pytorch_utils import Conv1D

from fls_hf.errors import PruningStateError
from fls_hf.model.adapters import adapter_for
from fls_hf.pruning.masks import MaskSet, pack_bits, unpack_bits

from helpers import MLP


def layers_of(model: nn.Module) -> dict:
    return {n: a for n, m in model.named_modules() if (a := adapter_for(n, m)) is not None}


def mixed_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"lin": nn.Linear(5, 3), "conv1d": Conv1D(4, 6), "conv": nn.Conv2d(2, 3, 3)})


def random_masks(masks: MaskSet, fraction: float = 0.5, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in masks:
        masks.set(name, torch.rand(masks.keep_matrix(name).shape, generator=g) > fraction)


def test_dense_masks_follow_parameter_shapes_and_stay_outside_the_model():
    model = mixed_model()
    layers = layers_of(model)
    masks = MaskSet.dense(layers)
    assert masks.names == ["conv", "conv1d", "lin"]
    for name, adapter in layers.items():
        assert masks.keep(name).shape == adapter.weight.shape and masks.keep(name).all()
        assert masks.keep_matrix(name).shape == adapter.shape
    assert masks.global_sparsity() == 0.0 and masks.num_pruned() == 0
    assert masks.numel() == 15 + 24 + 54
    assert len(model.state_dict()) == 6 and not list(model.buffers())


def test_set_updates_in_place_through_the_matrix_view():
    layers = layers_of(mixed_model())
    masks = MaskSet.dense(layers)
    stored = masks.keep("conv1d")
    pointer = stored.data_ptr()
    keep = torch.ones(4, 6, dtype=torch.bool)  # Conv1D(nf=4, nx=6): matrix (out, in) = (4, 6)
    keep[3, 5] = False
    masks.set("conv1d", keep)
    assert masks.keep("conv1d") is stored and stored.data_ptr() == pointer
    assert not stored[5, 3] and int((~stored).sum()) == 1  # the parameter is stored (in, out)
    assert masks.num_pruned("conv1d") == 1 and masks.sparsity("conv1d") == pytest.approx(1 / 24)
    with pytest.raises(PruningStateError, match="conv1d"):
        masks.set("conv1d", torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(PruningStateError, match="missing_layer"):
        masks.keep("missing_layer")
    with pytest.raises(PruningStateError, match="module `lin` must be bool of the weight's shape"):
        MaskSet(layers, {n: masks.keep(n) for n in masks} | {"lin": torch.ones(5, 3, dtype=torch.bool)})


def test_apply_and_zero_grads():
    model = mixed_model()
    layers = layers_of(model)
    masks = MaskSet.dense(layers)
    random_masks(masks)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    masks.zero_grads(layers)
    masks.apply(layers)
    for name, adapter in layers.items():
        pruned = ~masks.keep(name)
        assert (adapter.weight[pruned] == 0).all() and (adapter.weight.grad[pruned] == 0).all()
        assert (adapter.weight.grad[~pruned] == 1).all()
    assert (model["lin"].bias.grad == 1).all()  # biases are never masked


def test_masks_survive_adamw_with_weight_decay():
    model = MLP((6, 8, 3))
    layers = layers_of(model)
    masks = MaskSet.dense(layers)
    random_masks(masks, 0.6)
    masks.apply(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        masks.zero_grads(layers)
        opt.step()
        masks.apply(layers)
    for name, adapter in layers.items():
        assert (adapter.weight[~masks.keep(name)] == 0).all()
    # without re-applying, one more step regrows pruned weights: the test above is not vacuous
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert any((a.weight[~masks.keep(n)] != 0).any() for n, a in layers.items())


def test_pack_bits_matches_numpy_packbits():
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1)))
    assert torch.equal(unpack_bits(packed, (5, 7)), mask)


def test_state_round_trip_through_safetensors():
    layers = layers_of(mixed_model())
    masks = MaskSet.dense(layers)
    random_masks(masks)
    state = masks.state_dict()
    assert state["meta"] == {"conv": [3, 2, 3, 3], "conv1d": [6, 4], "lin": [3, 5]}
    assert all(t.dtype == torch.uint8 for t in state["tensors"].values())
    restored = MaskSet.dense(layers_of(mixed_model()))
    restored.load_state_dict({"tensors": st_load(st_save(state["tensors"])), "meta": state["meta"]})
    for name in masks:
        assert torch.equal(restored.keep(name), masks.keep(name))
    assert restored.digest() == masks.digest()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda s: s["tensors"].pop("lin"), "missing module.*lin"),
        (lambda s: s["meta"].update(extra=[1, 2]), "unexpected.*extra"),
        (lambda s: s["meta"].update(lin=[5, 3]), "module `lin` has shape"),
        (lambda s: s["tensors"].update(conv=s["tensors"]["conv"][:-1]), "module `conv` is truncated"),
        (lambda s: s["tensors"].update(conv1d=s["tensors"]["conv1d"].float()), "module `conv1d` must be a 1-D uint8"),
    ],
    ids=["missing", "extra", "shape", "truncated", "dtype"],
)
def test_bad_state_names_the_module_and_changes_nothing(corrupt, match):
    layers = layers_of(mixed_model())
    source = MaskSet.dense(layers)
    random_masks(source)
    state = source.state_dict()
    corrupt(state)
    target = MaskSet.dense(layers_of(mixed_model()))
    with pytest.raises(PruningStateError, match=match):
        target.load_state_dict(state)
    assert target.num_pruned() == 0


def test_digest_changes_with_one_bit():
    layers = layers_of(mixed_model())
    masks = MaskSet.dense(layers)
    before = masks.digest()
    masks.keep("conv")[2, 1, 0, 2] = False
    assert masks.digest() != before
    masks.keep("conv")[2, 1, 0, 2] = True
    assert masks.digest() == before

"""Compressed checkpoints: bit-exact round trip, size, refusal of damaged files, no pickle."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, GPT2LMHeadModel

from fls_hf import PruningStateError, load_recipe
from fls_hf.compressed import WEIGHTS_FILE, load_compressed, save_compressed
from fls_hf.model.targets import resolve_targets

from helpers import tiny_bert, tiny_gpt2

RECIPE = {
    "pruning": {
        "method": "magnitude",
        "targets": [r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)$"],
        "ignore": ["classifier", "re:.*pooler.*"],
        "final_sparsity": 0.9,
    },
}
GPT2_LAYERS = ["re:.*h\\.\\d+\\..*(c_attn|c_proj|c_fc)$"]


@torch.no_grad()
def sparsify(model, names, sparsity=0.9, negative_zeros=True, seed=0):
    """Zero a random `sparsity` share of each named layer's weight as the pruner does (+0.0); with
    `negative_zeros`, as multiplying by a 0/1 mask does (−0.0 where the weight was negative)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        keep = torch.rand(weight.shape, generator=g) >= sparsity
        if negative_zeros:
            weight.mul_(keep)
        else:
            weight.masked_fill_(~keep, 0)
    return model


def bits(tensor):
    return tensor.detach().view(torch.uint8) if tensor.is_floating_point() else tensor


def assert_bit_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(bits(sa[key]), bits(sb[key])), key


def sparse_bert(negative_zeros=True, **overrides):
    model = tiny_bert(**overrides)
    recipe = load_recipe(RECIPE)
    return sparsify(
        model, resolve_targets(model, recipe.pruning.targets, recipe.pruning.ignore), negative_zeros=negative_zeros
    )


@pytest.mark.parametrize("load_into", ["auto_class", "model_class", "instance"])
def test_bert_round_trip_is_bit_identical(tmp_path, load_into):
    model = sparse_bert()
    assert any(torch.signbit(p[p == 0]).any() for p in model.parameters())  # −0.0 must come back as −0.0
    save_compressed(model, tmp_path, RECIPE)
    target = {
        "auto_class": AutoModelForSequenceClassification,
        "model_class": BertForSequenceClassification,
        "instance": tiny_bert(seed=1),
    }[load_into]
    loaded = load_compressed(target, tmp_path)
    assert_bit_identical(model, loaded)
    assert loaded.training == (load_into == "instance")  # built from a class: eval mode, like from_pretrained


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_conv1d_tied_weights_and_dtype_round_trip(tmp_path, dtype):
    model = tiny_gpt2().to(dtype)
    layers = resolve_targets(model, GPT2_LAYERS)
    sparsify(model, layers)
    save_compressed(model, tmp_path, list(layers))
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        assert json.loads(f.metadata()["aliases"]) == {"lm_head.weight": "transformer.wte.weight"}  # stored once
        assert f.get_tensor("values/transformer.h.0.attn.c_attn.weight").dtype == dtype
    loaded = load_compressed(GPT2LMHeadModel(model.config).to(dtype), tmp_path)
    assert_bit_identical(model, loaded)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def tensor_bytes(path, keys):
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)


def test_compressed_file_is_much_smaller_than_dense(tmp_path):
    """hidden 64 / intermediate 256: the targeted weights dominate. Measured: 7.6× on them, 4.1× for the whole file."""
    model = sparse_bert(negative_zeros=False, hidden_size=64, intermediate_size=256, num_attention_heads=4)
    model.save_pretrained(tmp_path / "dense")
    path = save_compressed(model, tmp_path / "sparse", RECIPE)
    recipe = load_recipe(RECIPE)
    keys = [f"{n}.weight" for n in resolve_targets(model, recipe.pruning.targets, recipe.pruning.ignore)]
    dense = tensor_bytes(tmp_path / "dense" / "model.safetensors", keys)
    compressed = tensor_bytes(path, [f"{part}/{k}" for k in keys for part in ("bitmask", "values")])
    assert dense / compressed > 7.0  # 4 bytes vs 1/8 + 0.1 · 4 = 0.525 bytes per weight: 7.62×
    assert os.path.getsize(tmp_path / "dense" / "model.safetensors") / os.path.getsize(path) > 3.5


def test_truncated_or_corrupt_file_is_refused(tmp_path):
    path = save_compressed(sparse_bert(), tmp_path, RECIPE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PruningStateError, match="unreadable or truncated"):
        load_compressed(BertForSequenceClassification, tmp_path)
    path.unlink()
    with pytest.raises(PruningStateError, match="no compressed checkpoint"):
        load_compressed(BertForSequenceClassification, tmp_path)


def test_mismatched_entries_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_compressed(sparse_bert(), tmp_path, RECIPE)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    key = "values/bert.encoder.layer.0.attention.self.query.weight"
    save_file({**tensors, key: tensors[key][:-1]}, str(path), metadata=metadata)
    with pytest.raises(
        PruningStateError, match=r"`values/bert\.encoder\.layer\.0\.attention\.self\.query\.weight` holds"
    ):
        load_compressed(BertForSequenceClassification, tmp_path)
    save_file(tensors, str(path), metadata={**metadata, "version": "0"})
    with pytest.raises(PruningStateError, match="version '0'"):
        load_compressed(BertForSequenceClassification, tmp_path)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(PruningStateError, match="does not match"):
        load_compressed(tiny_bert(hidden_size=32), tmp_path)


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    model = sparse_bert()
    save_compressed(model, tmp_path, RECIPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_FILE]
    header = (tmp_path / WEIGHTS_FILE).read_bytes()[:9]
    assert header[8:9] == b"{"  # safetensors: 8-byte header length, then JSON; a pickle starts with b"\x80"

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert_bit_identical(model, load_compressed(BertForSequenceClassification, tmp_path))

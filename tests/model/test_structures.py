"""FFN blocks found in BERT and Llama models, and `shrink_ffn` (issue 20): removing neurons whose consumer column
is zero gives the same outputs, and the shrunk model round-trips through plain `from_pretrained`."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fls_hf.errors import RecipeError
from fls_hf.model.structures import ffn_blocks, live_neurons, save_shrunk, shrink_ffn

from helpers import MLP, causal_batches, tiny_bert, tiny_llama, token_batches


def test_ffn_blocks_of_bert_and_llama():
    bert = ffn_blocks(tiny_bert())
    assert [b.prefix for b in bert] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert bert[0].producers == ("bert.encoder.layer.0.intermediate.dense",)
    assert bert[0].consumer == "bert.encoder.layer.0.output.dense"  # not attention.output.dense
    llama = ffn_blocks(tiny_llama())
    assert llama[1].producers == ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert llama[1].consumer == "model.layers.1.mlp.down_proj"
    assert ffn_blocks(MLP()) == []


def _kill(model, block, neurons):
    with torch.no_grad():
        model.get_submodule(block.consumer).weight[:, neurons] = 0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_shrink_removes_dead_neurons_exactly_and_reloads_with_plain_transformers(tmp_path, family):
    model = (tiny_bert() if family == "bert" else tiny_llama()).eval()
    blocks = ffn_blocks(model)
    width = model.config.intermediate_size
    _kill(model, blocks[0], [1, 4, 5, 9, 20])  # unequal counts: the wider block sets the width
    _kill(model, blocks[1], [0, 2])
    batch = {k: v for k, v in token_batches()[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
    report = shrink_ffn(model)
    assert report["intermediate_size"] == width - 2 == model.config.intermediate_size
    assert report[blocks[0].prefix] == width - 5 and report[blocks[1].prefix] == width - 2
    assert model.get_submodule(blocks[0].consumer).weight.shape[1] == width - 2
    assert int((~live_neurons(model, blocks[0])).sum()) == 3  # zero padding up to the common width
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == width - 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, before, rtol=0, atol=1e-6)
    saved = sum(p.numel() for p in reloaded.parameters())
    assert saved < sum(p.numel() for p in (tiny_bert() if family == "bert" else tiny_llama()).parameters())


def test_shrink_refuses_models_without_ffn_blocks():
    with pytest.raises(RecipeError, match="no FFN block"):
        shrink_ffn(MLP())


def test_causal_batches_label_real_tokens():
    batch = causal_batches(n_batches=1)[0]
    assert bool((batch["labels"][batch["attention_mask"] == 0] == -100).all())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_save_shrunk_leaves_the_model_alone_and_reloads_with_the_same_logits(tmp_path, family):
    model = (tiny_bert() if family == "bert" else tiny_llama()).eval()
    blocks = ffn_blocks(model)
    width = model.config.intermediate_size
    for block in blocks:
        _kill(model, block, list(range(0, width, 2)))
    batch = {k: v for k, v in token_batches()[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
    report = save_shrunk(model, tmp_path)
    assert report["intermediate_size"] == width // 2
    assert model.config.intermediate_size == width  # the live model keeps its shapes (training goes on)
    assert model.get_submodule(blocks[0].consumer).weight.shape[1] == width
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == width // 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, before, rtol=0, atol=1e-6)

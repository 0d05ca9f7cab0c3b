"""FFN and attention blocks found in BERT and Llama models, and `shrink` (issue 20): removing neurons / heads whose
consumer columns are zero gives the same outputs, and the shrunk model round-trips through plain `from_pretrained`."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fls_hf.errors import RecipeError
from fls_hf.model.structures import (
    attention_blocks,
    ffn_blocks,
    live_groups,
    save_shrunk,
    shrink,
    shrink_ffn,
    structure_blocks,
)

from helpers import (
    MLP,
    causal_batches,
    tiny_bert,
    tiny_decoder,
    tiny_gpt2,
    tiny_llama,
    token_batches,
    zero_removed_inputs,
)


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
    assert report[blocks[0].prefix + "/neurons"] == width - 5 and report[blocks[1].prefix + "/neurons"] == width - 2
    assert model.get_submodule(blocks[0].consumer).weight.shape[1] == width - 2
    assert int((~live_groups(model, blocks[0])).sum()) == 3  # zero padding up to the common width
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
    with pytest.raises(RecipeError, match="has no `config` to shrink"):
        shrink_ffn(MLP())
    with pytest.raises(RecipeError, match="no block fls_hf can shrink"):  # BERT's heads: head size from the config
        shrink(tiny_bert(), "heads")


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


def test_attention_blocks_group_kv_heads_with_their_query_heads():
    bert = attention_blocks(tiny_bert())  # 2 heads of 8
    assert [b.prefix for b in bert] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert bert[0].consumer == "bert.encoder.layer.0.attention.output.dense"
    assert (bert[0].groups, bert[0].columns, bert[0].shrinkable) == (2, 8, False)
    assert bert[0].producer_segments == (((0, 8),),) * 3
    llama = attention_blocks(tiny_llama())  # 4 query heads of 4 over 2 KV heads
    assert llama[0].producers == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert (llama[0].groups, llama[0].columns, llama[0].heads_per_group) == (2, 8, 2)
    assert llama[0].producer_segments == (((0, 8),), ((0, 4),), ((0, 4),))
    assert llama[0].config_sizes(1) == {"num_key_value_heads": 1, "num_attention_heads": 2}


def test_llama_heads_shrink_by_kv_group_and_reload_with_the_same_logits(tmp_path):
    model = tiny_llama().eval()
    blocks = attention_blocks(model)
    with torch.no_grad():
        for block in blocks:  # the second KV group (query heads 2, 3) of every layer
            model.get_submodule(block.consumer).weight[:, 8:] = 0
    batch = {k: v for k, v in token_batches()[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
    report = save_shrunk(model, tmp_path, "heads")
    assert report["num_key_value_heads"] == 1 and report["num_attention_heads"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[0].self_attn.q_proj.weight.shape == (8, 16)
    assert reloaded.model.layers[0].self_attn.k_proj.weight.shape == (4, 16)
    assert reloaded.config.head_dim == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, before, rtol=0, atol=1e-6)
    shrink(model, "heads")  # in place: the live model runs shrunk too
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-6)


def test_heads_normalised_across_heads_are_no_groups():
    """OLMo-2 normalises q / k over the whole projection, so a head cannot go alone: no heads block (a clear error),
    while its FFN neurons and Qwen3's per-head norms are fine."""
    olmo, qwen = (tiny_decoder(family, num_hidden_layers=1) for family in ("Olmo2", "Qwen3"))
    assert attention_blocks(olmo) == [] and len(ffn_blocks(olmo)) == 1
    assert attention_blocks(qwen)[0].groups == 2
    with pytest.raises(RecipeError, match="Olmo2ForCausalLM has no heads block fls_hf knows.*OLMo-2 normalises"):
        structure_blocks(olmo, "heads")


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Mistral", "Gemma2", "Granite", "Starcoder2"])
def test_llama_like_families_shrink_neurons_and_heads_and_reload(tmp_path, family):
    from fls_hf import oneshot, save_shrunk

    model = tiny_decoder(family, hidden_size=32, head_dim=8).eval()
    batches = causal_batches()
    pruning = {"method": "magnitude", "mask_type": "neurons+heads", "final_sparsity": 0.5, "head_sparsity": 0.5}
    oneshot(model, batches, {"pruning": {**pruning, "global_sparsity": False}})
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        masked = model(**inputs).logits
    sizes = save_shrunk(model, str(tmp_path))
    assert (sizes["intermediate_size"], sizes["num_key_value_heads"], sizes["num_attention_heads"]) == (12, 1, 2)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["kfac", "taylor"])
def test_phi3_fused_projections_shrink_and_reload(tmp_path, method):
    """Phi-3 stacks gate and up in one gate_up_proj (chunked in two): neuron j is its rows j and width + j; and q, k,
    v in one qkv_proj: a KV group is its query heads' rows, then its key and value rows further down."""
    from fls_hf import oneshot, save_shrunk

    model = tiny_decoder("Phi3", head_dim=None).eval()  # Phi-3's config holds no head_dim: hidden / heads
    (block, _) = ffn_blocks(model)
    assert block.producer_segments == (((0, 1), (24, 1)),)
    assert block.producer_rows(0, torch.tensor([3, 5])).tolist() == [3, 5, 27, 29]
    batches = causal_batches()
    curvature = {"num_examples": 16} if method == "kfac" else {"num_batches": 2}
    (heads, _) = attention_blocks(model)
    assert heads.producer_segments == (((0, 8), (16, 4), (24, 4)),)  # 2 KV groups of 2 query heads, head_dim 4
    recipe = {"method": method, "mask_type": "neurons+heads", "final_sparsity": 0.5, "head_sparsity": 0.5}
    oneshot(model, batches, {"pruning": {**recipe, "global_sparsity": False}, "curvature": curvature})
    gone = ~live_groups(model, block)
    gate_up = model.get_submodule(block.producers[0]).weight
    assert int(gone.sum()) == 12 and not gate_up[:24][gone].any() and not gate_up[24:][gone].any()
    kv_gone = int(torch.nonzero(~live_groups(model, heads)).flatten())
    qkv = model.get_submodule(heads.producers[0]).weight
    assert not qkv[heads.producer_rows(0, torch.tensor([kv_gone]))].any() and qkv[16 + 4 * (1 - kv_gone)].any()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        masked = model(**inputs).logits
    sizes = save_shrunk(model, str(tmp_path))
    assert (sizes["intermediate_size"], sizes["num_attention_heads"], sizes["head_dim"]) == (12, 2, 4)
    assert not hasattr(model.config, "head_dim")  # the model in memory keeps its config
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[0].mlp.gate_up_proj.weight.shape == (24, 16)
    assert reloaded.model.layers[0].self_attn.qkv_proj.weight.shape == (16, 16)  # q 2 × 4, k 4, v 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=0, atol=1e-5)


def _half_of_neurons_and_heads(model, method: str) -> tuple[dict, torch.Tensor]:
    """One-shot removal of half of every block's neurons and heads (`method`: magnitude, or kfac's group OBS);
    returns the inputs of a batch and the masked model's logits on them."""
    from fls_hf import oneshot

    batches = causal_batches()
    pruning = {"method": method, "mask_type": "neurons+heads", "final_sparsity": 0.5, "head_sparsity": 0.5}
    curvature = {"num_examples": 16} if method == "kfac" else {}
    oneshot(model, batches, {"pruning": {**pruning, "global_sparsity": False}, "curvature": curvature})
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        return inputs, model(**inputs).logits


@pytest.mark.parametrize("method", ["magnitude", "kfac"])
def test_gpt_neox_interleaved_heads_and_neurons(tmp_path, method):
    """GPT-NeoX (Pythia) fuses q, k, v per head: head h is rows [3·h·d, 3·(h+1)·d) of query_key_value. Removing a head
    or a neuron leaves the outputs of zeroing its consumer columns alone; the FFN shrinks, the heads stay as zeros
    (its head size is hidden_size / num_attention_heads, as BERT's)."""
    model = tiny_decoder("GPTNeoX", head_dim=None, num_key_value_heads=None).eval()
    original = copy.deepcopy(model)
    (heads, _) = attention_blocks(model)
    assert heads.producers == ("gpt_neox.layers.0.attention.query_key_value",) and heads.groups == 4
    assert heads.producer_rows(0, torch.tensor([1])).tolist() == list(range(12, 24))
    inputs, masked = _half_of_neurons_and_heads(model, method)
    for ffn, block in zip(ffn_blocks(model), attention_blocks(model)):
        gone = torch.nonzero(~live_groups(model, block)).flatten()
        assert len(gone) == 2
        qkv = model.get_submodule(block.producers[0]).weight
        rows = torch.zeros(len(qkv), dtype=torch.bool)
        rows[block.producer_rows(0, gone)] = True
        assert not qkv[rows].any() and qkv[~rows].ne(0).all(dim=1).all()  # the removed heads' rows, no others
        if method == "magnitude":  # no compensation: zeroing the consumer columns alone gives the same model
            with torch.no_grad():
                original.get_submodule(block.consumer).weight[:, block.consumer_columns(gone)] = 0
                dead = torch.nonzero(~live_groups(model, ffn)).flatten()
                original.get_submodule(ffn.consumer).weight[:, dead] = 0
    if method == "magnitude":
        with torch.no_grad():
            torch.testing.assert_close(original(**inputs).logits, masked, rtol=0, atol=1e-5)
    sizes = save_shrunk(model, str(tmp_path))
    assert sizes["intermediate_size"] == 12 and "num_attention_heads" not in sizes
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.gpt_neox.layers[0].mlp.dense_4h_to_h.weight.shape == (16, 12)
    assert reloaded.config.num_attention_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "kfac"])
def test_gpt2_conv1d_heads_and_neurons(tmp_path, method):
    """GPT-2's Conv1D layers store their weight as (in, out): a neuron is row j of c_proj's weight and column j of
    c_fc's, a head the (q | k | v) columns of c_attn. Removing them leaves the outputs of zeroing the consumer's
    inputs alone; the FFN shrinks through `n_inner`, the heads stay as zeros (head size hidden / heads, as BERT's)."""
    model = tiny_gpt2().eval()  # 16 wide, 2 heads of 8, n_inner unset: 64 neurons
    original = copy.deepcopy(model)
    (ffn,), (heads,) = ffn_blocks(model)[:1], attention_blocks(model)[:1]
    assert (ffn.producers, ffn.consumer, ffn.groups, ffn.width_key) == (
        ("transformer.h.0.mlp.c_fc",),
        "transformer.h.0.mlp.c_proj",
        64,
        "n_inner",
    )
    assert heads.producers == ("transformer.h.0.attn.c_attn",) and heads.consumer == "transformer.h.0.attn.c_proj"
    assert heads.groups == 2 and not heads.shrinkable  # head 1: its q, k and v rows of the (48, 16) matrix view
    assert heads.producer_rows(0, torch.tensor([1])).tolist() == [*range(8, 16), *range(24, 32), *range(40, 48)]
    inputs, masked = _half_of_neurons_and_heads(model, method)
    for ffn, block in zip(ffn_blocks(model), attention_blocks(model)):
        dead = torch.nonzero(~live_groups(model, ffn)).flatten()
        gone = torch.nonzero(~live_groups(model, block)).flatten()
        assert len(dead) == 32 and len(gone) == 1
        c_fc, c_attn = (model.get_submodule(b.producers[0]).weight for b in (ffn, block))
        assert not c_fc[:, dead].any() and c_fc.ne(0).sum() == 16 * 32  # the removed neurons' columns, no others
        rows = torch.zeros(48, dtype=torch.bool)
        rows[block.producer_rows(0, gone)] = True
        assert not c_attn[:, rows].any() and c_attn[:, ~rows].ne(0).all()
        assert not model.get_submodule(ffn.consumer).weight[dead].any()  # c_proj's (in, out): its input rows
        if method == "magnitude":  # no compensation: zeroing the consumer's inputs alone gives the same model
            with torch.no_grad():
                original.get_submodule(block.consumer).weight[block.consumer_columns(gone)] = 0
                original.get_submodule(ffn.consumer).weight[dead] = 0
    if method == "magnitude":
        with torch.no_grad():
            torch.testing.assert_close(original(**inputs).logits, masked, rtol=0, atol=1e-5)
    sizes = save_shrunk(model, str(tmp_path))
    assert sizes["n_inner"] == 32 and "num_attention_heads" not in sizes and model.config.n_inner is None
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    assert reloaded.config.n_inner == 32 and reloaded.transformer.h[0].mlp.c_fc.weight.shape == (16, 32)
    assert reloaded.transformer.h[1].mlp.c_proj.weight.shape == (32, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=0, atol=1e-5)
    shrink(model)  # in place: the same
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, masked, rtol=0, atol=1e-5)


def _tiny(family: str, head: str, settings: dict):
    """transformers' `<family><head>` (e.g. GPTJForCausalLM) from `<family>Config(vocab_size=64, **settings)`, seed 0,
    in eval mode."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(vocab_size=64, **settings)
    return getattr(transformers, f"{family}{head}")(config).eval()


NEURON_FAMILIES = {  # FFN c_fc → c_proj (Linear) or fc_in → fc_out; the width's config key
    "GPTBigCode": ({"n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 2}, "n_inner"),
    "GPTNeo": (
        {"max_position_embeddings": 32, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "window_size": 8}
        | {"attention_types": [[["global", "local"], 1]]},
        "intermediate_size",
    ),
    "GPTJ": ({"n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 2, "rotary_dim": 4}, "n_inner"),
    "CodeGen": ({"n_positions": 32, "n_ctx": 32, "n_embd": 16, "n_layer": 2, "n_head": 2, "rotary_dim": 4}, "n_inner"),
    "Falcon": ({"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}, "ffn_hidden_size"),
}


@pytest.mark.parametrize("family", NEURON_FAMILIES)
def test_gpt_style_ffn_neurons_shrink_through_their_own_config_key(tmp_path, family):
    """GPT-BigCode / GPT-Neo (mlp.c_fc → c_proj, Linear), GPT-J / CodeGen (mlp.fc_in → fc_out) and Falcon
    (dense_h_to_4h → dense_4h_to_h): half of the neurons go, the saved model sets the width in the config entry its
    family reads (unset: 4 × hidden) and reloads with plain transformers, same logits."""
    from fls_hf import oneshot

    settings, key = NEURON_FAMILIES[family]
    model = _tiny(family, "ForCausalLM", settings)
    assert [b.width_key for b in ffn_blocks(model)] == [key, key] and getattr(model.config, key) in (None, 64)
    pruning = {"method": "magnitude", "mask_type": "neurons", "final_sparsity": 0.5, "global_sparsity": False}
    oneshot(model, causal_batches(), {"pruning": pruning})
    inputs = {k: v for k, v in causal_batches()[0].items() if k != "labels"}
    with torch.no_grad():
        masked = model(**inputs).logits
    assert save_shrunk(model, str(tmp_path))[key] == 32  # of 4 × 16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(reloaded.config, key) == 32
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("multi_query", [False, True])
def test_gpt_bigcode_heads_are_not_read_as_gpt2s(multi_query):
    """GPT-BigCode names its layers as GPT-2 does (attn.c_attn → attn.c_proj) but its nn.Linear c_attn interleaves
    q, k, v per head (or holds one shared KV head): read as GPT-2's q | k | v stacking it would lose the wrong rows,
    so its heads are no groups and a heads recipe is refused by name."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    settings, _ = NEURON_FAMILIES["GPTBigCode"]
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=64, multi_query=multi_query, **settings))
    assert attention_blocks(model) == [] and len(ffn_blocks(model)) == 2
    with pytest.raises(RecipeError, match="GPTBigCodeForCausalLM has no heads block"):
        structure_blocks(model, "heads")


@pytest.mark.parametrize(("family", "attention"), [("GPTJ", "attn"), ("GPTNeo", "attn.attention")])
def test_gpt_j_and_neo_heads_are_removed_as_zeros(tmp_path, family, attention):
    """GPT-J's and GPT-Neo's separate q / k / v → out_proj: a head is its rows of q, k, v and its columns of out_proj;
    removing it equals zeroing those columns alone (magnitude: no compensation), and the saved model keeps it as
    zeros (the head size is hidden / heads) while the FFN shrinks."""
    settings, key = NEURON_FAMILIES[family]
    model = _tiny(family, "ForCausalLM", settings)
    original = copy.deepcopy(model)
    blocks = attention_blocks(model)
    assert [b.consumer for b in blocks] == [f"transformer.h.{i}.{attention}.out_proj" for i in (0, 1)]
    assert all(b.groups == 2 and b.columns == 8 and not b.shrinkable for b in blocks)
    inputs, masked = _half_of_neurons_and_heads(model, "magnitude")
    for block in blocks:
        [gone] = torch.nonzero(~live_groups(model, block)).flatten().tolist()
        for name in block.producers:  # the removed head's rows of q, k and v, no others
            weight = model.get_submodule(name).weight
            assert not weight[8 * gone : 8 * gone + 8].any() and weight[8 * (1 - gone) : 8 * (2 - gone)].ne(0).all()
        with torch.no_grad():
            original.get_submodule(block.consumer).weight[:, 8 * gone : 8 * gone + 8] = 0
    for ffn in ffn_blocks(model):
        with torch.no_grad():
            original.get_submodule(ffn.consumer).weight[:, ~live_groups(model, ffn)] = 0
    with torch.no_grad():
        torch.testing.assert_close(original(**inputs).logits, masked, rtol=0, atol=1e-5)
    sizes = save_shrunk(model, str(tmp_path))
    assert sizes[key] == 32 and "num_attention_heads" not in sizes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=0, atol=1e-5)


ENCODERS = {  # family → (config settings, the FFN width's config key)
    "DistilBert": (
        {"dim": 16, "hidden_dim": 32, "n_layers": 2, "n_heads": 2, "max_position_embeddings": 32},
        "hidden_dim",
    ),
    "ModernBert": (
        {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
        | {"max_position_embeddings": 32, "global_attn_every_n_layers": 1, "pad_token_id": 0},
        "intermediate_size",
    ),
}


@pytest.mark.parametrize("family", ENCODERS)
def test_distilbert_and_modernbert_neurons_shrink_and_heads_stay_as_zeros(tmp_path, family):
    """DistilBERT (ffn.lin1 → lin2; attention.q_lin / k_lin / v_lin → out_lin) and ModernBERT (mlp.Wi, input and
    gate fused, → Wo; attn.Wqkv, q | k | v fused, → Wo): removing half of the neurons and heads equals zeroing the
    consumers' columns alone (magnitude), the FFN shrinks through the family's config key, the heads stay as zeros,
    and the saved classifier reloads with plain transformers, same logits."""
    from fls_hf import oneshot

    settings, key = ENCODERS[family]
    model = _tiny(family, "ForSequenceClassification", {"num_labels": 2, **settings})
    original = copy.deepcopy(model)
    ffn, heads = ffn_blocks(model), attention_blocks(model)
    assert len(ffn) == len(heads) == 2 and all(b.groups == 32 for b in ffn) and all(b.groups == 2 for b in heads)
    assert all(not b.shrinkable for b in heads) and ffn[0].width_key == key
    pruning = {"method": "magnitude", "mask_type": "neurons+heads", "final_sparsity": 0.5, "head_sparsity": 0.5}
    batches = token_batches()
    oneshot(model, batches, {"pruning": {**pruning, "global_sparsity": False}})
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    assert zero_removed_inputs(model, original, ffn + heads) == [b.groups // 2 for b in ffn + heads]
    with torch.no_grad():
        masked = model(**inputs).logits
        torch.testing.assert_close(original(**inputs).logits, masked, rtol=0, atol=1e-5)
    sizes = save_shrunk(model, str(tmp_path))
    assert sizes[key] == 16 and "num_attention_heads" not in sizes
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert getattr(reloaded.config, key) == 16
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=0, atol=1e-5)

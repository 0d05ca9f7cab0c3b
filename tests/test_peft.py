"""Pruning under LoRA: target resolution on PEFT names, training, plain vs masked merge."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch.func import functional_call
from transformers import TrainingArguments

from fls_hf import FishLegPruningTrainer, FlsError, sparsity_report
from fls_hf.errors import RecipeError
from fls_hf.model.targets import plain_name, resolve_targets
from fls_hf.peft import is_peft_model, masked_merge_and_unload, warn_if_merge_densifies
from fls_hf.pruning.groups import removed_groups
from fls_hf.pruning.masks import MaskSet
from fls_hf.pruning.pruner import Pruner

from helpers import merge_shrink_reload, tiny_bert, tiny_gpt2, tiny_llama
from test_trainer import training_args

# peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates (pyproject turns that into an error).
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RECIPE = {
    "pruning": {
        "method": "magnitude",
        "targets": [r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)$"],
        "ignore": ["classifier", "re:.*pooler.*"],
        "init_sparsity": 0.5,
        "final_sparsity": 0.8,
        "start_step": 0,
        "end_step": 4,
        "update_frequency": 2,
    },
}
PREFIX = "base_model.model."


def dataset(n: int = 64, seq_len: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, seq_len), generator=g)
    labels = (ids[:, 0] > 32).long()
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def lora_bert(seed: int = 0, **overrides):
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")
    torch.manual_seed(seed)
    return get_peft_model(tiny_bert(seed=seed), LoraConfig(**{**settings, **overrides}))


def test_plain_name_drops_peft_prefix_and_wrapper_segments():
    assert (
        plain_name(PREFIX + "bert.encoder.layer.0.attention.self.query.base_layer")
        == "bert.encoder.layer.0.attention.self.query"
    )
    assert plain_name(PREFIX + "classifier.modules_to_save.default") == "classifier"
    assert plain_name(PREFIX + "classifier.original_module") == "classifier"
    assert plain_name("bert.encoder.layer.0.output.dense") == "bert.encoder.layer.0.output.dense"


@pytest.mark.parametrize(
    "pattern",
    [
        r"re:.*(query|value)$",  # written for the plain model, `$` anchored
        r"re:bert\.encoder\.layer\.\d+\..*(query|value)",  # anchored at the plain model's root
        "query",
        "value",  # suffix names
        "bert.encoder.layer.1.attention.self.query",  # an exact plain name
    ],
)
def test_plain_recipe_resolves_to_base_layers(pattern):
    plain = set(resolve_targets(tiny_bert(), [pattern]))
    wrapped = set(resolve_targets(lora_bert(), [pattern]))
    assert all(name.startswith(PREFIX) and name.endswith(".base_layer") for name in wrapped)
    assert {plain_name(name) for name in wrapped} == plain


def test_peft_names_resolve_too():
    wrapped = resolve_targets(lora_bert(), [r"re:.*(query|value)\.base_layer$"])
    assert set(wrapped) == set(resolve_targets(lora_bert(), ["query", "value"]))


def test_default_targets_skip_adapters_and_frozen_copies():
    model = lora_bert()
    everything = set(resolve_targets(model, None))
    assert not any("lora_" in name or "original_module" in name for name in everything)
    assert PREFIX + "classifier.modules_to_save.default" in everything  # the trainable copy of the head
    ignore = ["classifier", "re:.*pooler.*"]
    assert {plain_name(n) for n in resolve_targets(model, None, ignore)} == set(
        resolve_targets(tiny_bert(), None, ignore)
    )


def train_pruned_lora(tmp_path, max_steps: int = 6):
    model = lora_bert()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    trainer = FishLegPruningTrainer(model=model, args=args, recipe=RECIPE, train_dataset=dataset())
    with pytest.warns(UserWarning, match="masked_merge_and_unload") as caught:
        trainer.train()
    assert sum("masked_merge_and_unload" in str(w.message) for w in caught) == 1
    return trainer, lora_before


def test_lora_training_prunes_base_weights_while_adapters_train(tmp_path):
    trainer, lora_before = train_pruned_lora(tmp_path)
    model = trainer.model
    report = sparsity_report(model, trainer.recipe)
    assert report.zeros == round(0.8 * report.numel)
    assert any(name.endswith("query.base_layer") for name in trainer.pruner.layers)
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert (param != 0).all(), f"{name} must stay dense"
            assert not torch.equal(param, lora_before[name]), f"{name} must train"


def test_plain_merge_densifies_masked_merge_keeps_exact_zeros(tmp_path):
    trainer, _ = train_pruned_lora(tmp_path)
    model, recipe, masks = trainer.model, trainer.recipe, trainer.pruner.masks
    pruned = sparsity_report(model, recipe)
    batch = {k: torch.tensor(v) for k, v in dataset(4, seed=2)[:4].items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        peft_logits = model(**batch).logits
    base = {key: trainer.pruner.layers[key].weight.detach().clone() for key in masks}
    delta = {
        key: model.get_submodule(key.removesuffix(".base_layer")).get_delta_weight("default").detach()
        for key in masks
        if key.endswith(".base_layer")
    }

    densified = copy.deepcopy(model).merge_and_unload()
    plain_report = sparsity_report(densified, recipe)
    assert plain_report.global_sparsity < pruned.global_sparsity - 0.1
    assert all(layer.sparsity == 0 for layer in plain_report.layers if layer.name.endswith(("query", "value")))

    merged = masked_merge_and_unload(model, trainer.pruner)
    assert not is_peft_model(merged)
    merged_report = sparsity_report(merged, recipe)
    assert [(x.name, x.zeros) for x in merged_report.layers] == [(plain_name(x.name), x.zeros) for x in pruned.layers]
    restored = {}
    for key, keep in ((key, masks.keep(key)) for key in masks):
        weight = merged.get_submodule(plain_name(key)).weight
        expected = torch.where(keep, base[key] + delta.get(key, 0), torch.zeros_like(weight))
        assert torch.equal(weight, expected), key  # (W + ΔW) ⊙ keep, bit for bit
        if key in delta:  # adding back the adapter update on pruned coordinates gives the PEFT model again
            restored[plain_name(key) + ".weight"] = weight + delta[key] * keep.logical_not()
    assert restored
    with torch.no_grad():
        torch.testing.assert_close(functional_call(merged, restored, args=(), kwargs=batch).logits, peft_logits)
        assert not torch.allclose(merged(**batch).logits, peft_logits, atol=1e-6)


def test_masked_merge_accepts_a_mask_set_and_rejects_foreign_keys():
    model = lora_bert()
    layers = resolve_targets(model, ["query", "classifier"])  # a LoRA base layer and a `modules_to_save` copy
    assert PREFIX + "classifier.modules_to_save.default" in layers
    masks = MaskSet.dense(layers)
    for name in layers:
        masks.set(name, torch.rand(layers[name].shape) > 0.5)
    merged = masked_merge_and_unload(copy.deepcopy(model), masks)
    assert all(torch.equal(merged.get_submodule(plain_name(n)).weight != 0, masks.keep(n)) for n in layers)

    foreign = MaskSet.dense(resolve_targets(model.base_model, ["query"]))  # keys without the `base_model.model.` prefix
    with pytest.raises(
        FlsError, match=r"mask key `model\.bert\.encoder\.layer\.0\.attention\.self\.query\.base_layer`"
    ):
        masked_merge_and_unload(model, foreign)
    with pytest.raises(FlsError, match="is not a PEFT model"):
        masked_merge_and_unload(tiny_bert(), MaskSet.dense(resolve_targets(tiny_bert(), ["query"])))


def test_merge_warning_only_when_an_adapted_layer_is_pruned():
    model = lora_bert()
    unadapted = MaskSet.dense(resolve_targets(model, ["key"]))
    adapted = MaskSet.dense(resolve_targets(model, ["query"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_merge_densifies(model, adapted)  # nothing pruned yet
        name = adapted.names[0]
        unadapted.set(unadapted.names[0], torch.zeros(16, 16, dtype=torch.bool))
        assert not warn_if_merge_densifies(model, unadapted)
        assert not warn_if_merge_densifies(tiny_bert(), MaskSet.dense(resolve_targets(tiny_bert(), ["query"])))
    adapted.set(name, torch.zeros(16, 16, dtype=torch.bool))
    with pytest.warns(UserWarning, match=r"bert\.encoder\.layer\.0\.attention\.self\.query"):
        assert warn_if_merge_densifies(model, adapted)


STRUCTURE_RECIPE = {
    "pruning": {
        "method": "kfac",
        "global_sparsity": False,
        "init_sparsity": 0.25,
        "final_sparsity": 0.5,
        "start_step": 0,
        "end_step": 4,
        "update_frequency": 2,
    },
    "curvature": {"num_examples": 16},
}


@pytest.mark.parametrize("kind", ["neurons", "heads"])
def test_lora_structures_train_as_the_merged_shrunk_model(tmp_path, kind):
    """Under LoRA the removed groups' adapter columns / rows stay zero, so the PEFT model computes exactly what the
    merged model does, and that one shrinks and reloads with plain transformers."""
    from transformers import AutoModelForCausalLM

    from fls_hf import save_shrunk
    from fls_hf.model.structures import pruned_blocks

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(intermediate_size=16, num_attention_heads=8, num_key_value_heads=4),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets),
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (32, 8), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = training_args(tmp_path / "run", max_steps=6, learning_rate=1e-2, logging_steps=500)
    recipe = copy.deepcopy(STRUCTURE_RECIPE)
    recipe["pruning"]["mask_type"] = kind
    trainer = FishLegPruningTrainer(model=model, args=args, recipe=recipe, train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "a plain merge undoes the sparsity" warning (below)
        trainer.train()
    blocks = pruned_blocks(model, trainer.recipe.pruning)
    assert blocks and all(name.endswith(".base_layer") for b in blocks for name in b.modules)
    factors = trainer.pruner.adapter_factors
    assert len(factors) == len(blocks) * (1 + len(blocks[0].producers))  # lora_A of o / down, lora_B of each producer
    for block, (tensor, dim, producer) in factors:
        live = trainer.pruner.masks.keep_matrix(block.consumer).any(dim=0).reshape(-1, block.columns).any(dim=1)
        assert int((~live).sum()) == block.groups // 2
        groups = torch.arange(block.groups)
        index = block.consumer_columns if producer < 0 else lambda g, i=producer: block.producer_rows(i, g)
        entries = [tensor.detach().index_select(dim, index(g[None])) for g in groups]
        assert not any(e.any() for e, on in zip(entries, live) if not on)  # removed groups' entries zero
        assert all(e.any() for e, on in zip(entries, live) if on)  # kept ones trained
    with pytest.raises(RecipeError, match="merge them first"):
        save_shrunk(model, str(tmp_path / "peft"))
    trainer.save_model(str(tmp_path / "adapters"))  # PEFT saves the adapters, fls_hf its report
    assert {"adapter_config.json", "sparsity_report.json"} <= {p.name for p in (tmp_path / "adapters").iterdir()}
    batch = {"input_ids": ids[:4]}
    model.eval()
    with torch.no_grad():
        peft_logits = model(**batch).logits
        plain = copy.deepcopy(model).merge_and_unload()  # a plain merge keeps the removed groups zero too
        assert sparsity_report(plain, trainer.recipe).zeros == sparsity_report(model, trainer.recipe).zeros
        merged = masked_merge_and_unload(model, trainer.pruner)
        torch.testing.assert_close(merged(**batch).logits, peft_logits, rtol=0, atol=1e-5)  # nothing lost at merge
        torch.testing.assert_close(plain(**batch).logits, peft_logits, rtol=0, atol=1e-5)
        save_shrunk(merged, str(tmp_path / "shrunk"))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk").eval()
        torch.testing.assert_close(reloaded(**batch).logits, peft_logits, rtol=0, atol=1e-5)
    sizes = (reloaded.config.intermediate_size, reloaded.config.num_key_value_heads)
    assert sizes == ((8, 4) if kind == "neurons" else (16, 2))


def test_lora_on_bert_holds_each_kinds_removed_groups_at_zero(tmp_path):
    """BERT's FFN and attention blocks share their layer's prefix: each kind's removed groups are its own (keyed by
    prefix and kind; keyed by prefix alone the heads took the neurons' indices: out of range, or the wrong columns).
    Every removed group's LoRA entries stay zero through training, and the masked merge equals the PEFT model."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"], init_lora_weights=False
    )
    model = get_peft_model(tiny_bert(), config)  # B random: PEFT's zeros would hide rows left non-zero
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (32, 8), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > 32).long().tolist()})
    args = training_args(tmp_path / "run", max_steps=6, learning_rate=1e-2, logging_steps=500)
    recipe = copy.deepcopy(STRUCTURE_RECIPE)
    recipe["pruning"].update(mask_type="neurons+heads", head_sparsity=0.5)
    trainer = FishLegPruningTrainer(model=model, args=args, recipe=recipe, train_dataset=data)
    trainer.train()
    pruner = trainer.pruner
    assert {b.kind for b, _ in pruner.adapter_factors} == {"neurons", "heads"}
    for block, (tensor, dim, producer) in pruner.adapter_factors:
        gone = torch.nonzero(removed_groups(pruner.masks, block)).flatten()
        assert len(gone) == block.groups // 2
        index = block.consumer_columns(gone) if producer < 0 else block.producer_rows(producer, gone)
        assert not tensor.detach().index_select(dim, index).any()
    batch = {"input_ids": ids[:4]}
    model.eval()
    with torch.no_grad():
        peft_logits = model(**batch).logits
        merged = masked_merge_and_unload(model, pruner)
        torch.testing.assert_close(merged(**batch).logits, peft_logits, rtol=0, atol=1e-5)


def test_lora_on_gpt2_conv1d_removes_neurons_and_heads_and_merges_to_the_shrunk_model(tmp_path):
    """GPT-2's Conv1D layers under LoRA (fan_in_fan_out): the groups are read through the (out, in) matrix view, the
    adapters' removed entries stay zero, and the masked merge shrinks (n_inner) to the PEFT model's logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    targets = ["c_attn", "c_proj", "c_fc"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=True)
    model = get_peft_model(tiny_gpt2(), config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (32, 8), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = training_args(tmp_path / "run", max_steps=6, learning_rate=1e-2, logging_steps=500)
    recipe = copy.deepcopy(STRUCTURE_RECIPE)
    recipe["pruning"].update(mask_type="neurons+heads", head_sparsity=0.5)
    trainer = FishLegPruningTrainer(model=model, args=args, recipe=recipe, train_dataset=data)
    trainer.train()
    assert len(trainer.pruner.adapter_factors) == 4 * 2  # per layer: lora_A of both c_proj, lora_B of c_fc, c_attn
    batch = {"input_ids": ids[:4]}
    sizes, reloaded = merge_shrink_reload(model, trainer.pruner, batch, tmp_path / "shrunk", AutoModelForCausalLM)
    assert sizes["n_inner"] == reloaded.config.n_inner == 32 and reloaded.config.n_head == 2  # heads: zeros
    c_attn = reloaded.transformer.h[0].attn.c_attn.weight  # (in 16, out 48): one head's q, k, v columns zero
    assert [int(c_attn[:, 8 * i : 8 * (i + 1)].eq(0).all()) for i in range(6)].count(1) == 3


def test_lora_structures_refuse_dora_on_the_producers():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["up_proj"], use_dora=True))
    with pytest.raises(RecipeError, match="`model.layers.0.mlp.up_proj` uses DoRA"):
        Pruner(model, {"pruning": {"method": "magnitude", "mask_type": "neurons"}})

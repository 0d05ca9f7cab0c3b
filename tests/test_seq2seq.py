"""Encoder-decoders (T5, BART, Whisper): curvature passes run the decoder on the target sequence made from the
labels, each layer's rows are masked by its own stream (source or target), a `Seq2SeqTrainer` prunes them, and their
FFN neurons / heads are structures (the FFNs shrink per stack)."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoModelForSpeechSeq2Seq,
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from fls_hf import FishLegPruningCallback, oneshot, sparsity_report
from fls_hf.errors import CurvatureError
from fls_hf.fisher.kronecker import kronecker_statistics
from fls_hf.fisher.likelihoods import Categorical
from fls_hf.model import model_inputs, with_decoder_inputs
from fls_hf.model.structures import attention_blocks, ffn_blocks, save_shrunk
from fls_hf.model.targets import resolve_targets

from helpers import merge_shrink_reload, zero_removed_inputs

VOCAB, SOURCE, TARGET = 64, 10, 6


def tiny_t5(seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8)
    return T5ForConditionalGeneration(
        T5Config(**{**settings, **overrides}, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ).eval()


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=24, max_position_embeddings=32,
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval()


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    return WhisperForConditionalGeneration(config).eval()


def batch_for(family: str, n: int = 4, seed: int = 0) -> dict:
    """Source inputs with padding at the end of example 0, and labels padded with -100 at the end of examples
    1 and 2 (a target length other than the source's, so each layer's rows have one stream)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, VOCAB, (n, TARGET), generator=g)
    labels[1, -2:] = labels[2, -1:] = -100
    if family == "whisper":  # log-mel features: 2 × max_source_positions frames
        return {"input_features": torch.randn(n, 8, 16, generator=g), "labels": labels}
    mask = torch.ones(n, SOURCE, dtype=torch.long)
    mask[0, -3:] = 0
    return {"input_ids": torch.randint(3, VOCAB, (n, SOURCE), generator=g), "attention_mask": mask, "labels": labels}


FAMILIES = {"t5": tiny_t5, "bart": tiny_bart, "whisper": tiny_whisper}


@pytest.mark.parametrize("family", FAMILIES)
def test_curvature_forward_reads_the_decoder_inputs_the_models_own_loss_does(family):
    # T5 / BART make them with `prepare_decoder_input_ids_from_labels`; Whisper has none: the generic shift
    model, batch = FAMILIES[family](), batch_for(family)
    inputs = model_inputs(with_decoder_inputs(model, batch))
    assert "labels" not in inputs and inputs["decoder_input_ids"].shape == batch["labels"].shape
    assert (inputs["decoder_input_ids"] >= 0).all()  # -100 became the pad token
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**batch).logits)


def test_decoder_inputs_given_by_the_batch_are_kept():
    model, batch = tiny_t5(), batch_for("t5")
    given = torch.randint(3, VOCAB, (4, TARGET + 2))
    assert with_decoder_inputs(model, {**batch, "decoder_input_ids": given})["decoder_input_ids"] is given
    bert_like = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    assert with_decoder_inputs(torch.nn.Linear(2, 2), bert_like) is bert_like  # not an encoder-decoder


def test_an_encoder_decoder_batch_without_labels_or_decoder_inputs_is_refused():
    model, batch = tiny_t5(), batch_for("t5")
    del batch["labels"]
    with pytest.raises(CurvatureError, match=r"T5ForConditionalGeneration is an encoder-decoder.*decoder_input_ids"):
        oneshot(model, [batch], {"pruning": {"method": "kfac", "final_sparsity": 0.5}, "curvature": {"num_batches": 1}})
    assert all(torch.isfinite(p).all() and (p != 0).any() for p in model.parameters())  # nothing pruned


def test_each_layers_input_covariance_counts_the_real_rows_of_its_own_stream():
    """Ā of an encoder layer averages over the source's real tokens, of a decoder self-attention layer over the
    target's (labels ≠ -100), of a cross-attention key over the source's (it reads the encoder's output)."""
    model, batch = tiny_t5(), batch_for("t5")
    names = {
        "encoder.block.0.layer.0.SelfAttention.q": batch["attention_mask"].bool(),
        "decoder.block.0.layer.0.SelfAttention.q": batch["labels"] != -100,
        "decoder.block.0.layer.1.EncDecAttention.k": batch["attention_mask"].bool(),
    }
    layers = resolve_targets(model, list(names))
    stats = kronecker_statistics(model, [batch], layers, Categorical(), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(**model_inputs(with_decoder_inputs(model, batch)))
    for hook in hooks:
        hook.remove()
    for name, mask in names.items():
        rows = seen[name][mask]
        rows = torch.cat([rows, torch.ones(len(rows), 1)], 1)
        torch.testing.assert_close(stats[name][0], rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
    assert int((batch["attention_mask"] == 1).sum()) != int((batch["labels"] != -100).sum())  # the streams differ


def seq2seq_dataset(n: int = 32, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SOURCE), generator=g)
    labels = ids[:, :TARGET].flip(1).clone()  # learnable: the source's first tokens, reversed
    labels[::3, -2:] = -100
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


@pytest.mark.parametrize("method", ["kfac", "fishleg"])
def test_seq2seq_trainer_prunes_t5_gradually_and_the_saved_model_reloads(tmp_path, method):
    model = tiny_t5(d_ff=48).train()
    recipe = {
        "pruning": {
            "method": method,
            "ignore": ["lm_head"],
            "init_sparsity": 0.3,
            "final_sparsity": 0.6,
            "start_step": 0,
            "end_step": 6,
            "update_frequency": 3,
        },
        "curvature": {"num_batches": 2, **({"init_examples": 8, "warmup_steps": 2} if method == "fishleg" else {})},
    }
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-3, use_cpu=True,
        report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    callback = FishLegPruningCallback(recipe)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=seq2seq_dataset(), callbacks=[callback])
    trainer.train()
    report = sparsity_report(model, callback.recipe)
    assert report.global_sparsity == pytest.approx(0.6, abs=1e-3)
    pruned = {n for n in callback.pruner.masks}
    assert any(n.startswith("encoder.") for n in pruned) and any("EncDecAttention" in n for n in pruned)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved").eval()
    batch = {k: torch.tensor(v) for k, v in seq2seq_dataset(4, seed=1)[:4].items()}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


STRUCTURED = {  # case → (builder, the FFN width's config key in the encoder's and the decoder's blocks, loader)
    "t5": (lambda: tiny_t5(), ("d_ff", "d_ff"), AutoModelForSeq2SeqLM),
    "t5-gated": (lambda: tiny_t5(feed_forward_proj="gated-gelu"), ("d_ff", "d_ff"), AutoModelForSeq2SeqLM),
    "bart": (tiny_bart, ("encoder_ffn_dim", "decoder_ffn_dim"), AutoModelForSeq2SeqLM),
    "whisper": (tiny_whisper, ("encoder_ffn_dim", "decoder_ffn_dim"), AutoModelForSpeechSeq2Seq),
}


@pytest.mark.parametrize(
    ("case", "method"), [(c, "magnitude") for c in STRUCTURED] + [("t5-gated", "kfac"), ("bart", "kfac")]
)
def test_encoder_decoder_neurons_shrink_per_stack_and_heads_stay_as_zeros(tmp_path, case, method):
    """T5 (DenseReluDense.wi, or gated wi_0 / wi_1, → wo; d_ff), BART and Whisper (fc1 → fc2; encoder_ffn_dim and
    decoder_ffn_dim, one width each): half of the neurons and heads (self-attention, and the decoder's cross-attention)
    removed; magnitude's masked model equals zeroing the consumers' columns alone; the saved model has each stack's
    FFN halved, the heads as zeros (their head size follows hidden / heads, or T5's position bias has one per head),
    and reloads with plain transformers, same logits."""
    build, keys, loader = STRUCTURED[case]
    model = build()
    original = copy.deepcopy(model)
    ffn, heads = ffn_blocks(model), attention_blocks(model)
    decoder = ["decoder" in b.prefix.split(".") for b in ffn]
    assert any(decoder) and not all(decoder) and all(b.width_key == keys[d] for b, d in zip(ffn, decoder))
    assert len(heads) == 3 * len(ffn) // 2 and not any(b.shrinkable for b in heads)  # decoders: self + cross
    widths = {key: getattr(model.config, key) for key in keys}
    family = "whisper" if case == "whisper" else "t5"
    batch = batch_for(family)
    pruning = {"method": method, "mask_type": "neurons+heads", "final_sparsity": 0.5, "head_sparsity": 0.5}
    oneshot(
        model,
        [batch],
        {
            "pruning": {**pruning, "global_sparsity": False},
            "curvature": {"num_examples": 4} if method == "kfac" else {},
        },
    )
    assert zero_removed_inputs(model, original, ffn + heads) == [b.groups // 2 for b in ffn + heads]
    with torch.no_grad():
        masked = model(**batch).logits
        if method == "magnitude":  # no compensation: the removed groups' consumer columns are all that changed
            torch.testing.assert_close(original(**batch).logits, masked, rtol=0, atol=1e-5)
    sizes = save_shrunk(model, str(tmp_path))
    assert {k: sizes[k] for k in keys} == {k: w // 2 for k, w in widths.items()} and "num_attention_heads" not in sizes
    reloaded = loader.from_pretrained(tmp_path).eval()
    assert all(getattr(reloaded.config, k) == w // 2 for k, w in widths.items())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, masked, rtol=0, atol=1e-5)


LORA_TARGETS = {
    "t5-gated": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft reads it
@pytest.mark.parametrize("case", sorted(LORA_TARGETS))
def test_seq2seq_trainer_with_lora_removes_neurons_and_heads_and_merges_to_the_shrunk_model(tmp_path, case):
    """Encoder-decoder + LoRA on every attention and FFN projection + Seq2SeqTrainer: the removed groups' adapter
    entries stay zero, so the masked merge computes what the PEFT model does, and it shrinks each stack's FFN and
    reloads with plain transformers, same logits."""
    peft = pytest.importorskip("peft")
    build, keys, _ = STRUCTURED[case]
    model = peft.get_peft_model(
        build().train(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[case])
    )
    widths = {key: getattr(model.config, key) for key in keys}
    recipe = {
        "pruning": {
            "method": "kfac", "mask_type": "neurons+heads", "head_sparsity": 0.5, "global_sparsity": False,
            "init_sparsity": 0.25, "final_sparsity": 0.5, "start_step": 0, "end_step": 4, "update_frequency": 2,
        },
        "curvature": {"num_examples": 8},
    }  # fmt: skip
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    callback = FishLegPruningCallback(recipe)
    Seq2SeqTrainer(model=model, args=args, train_dataset=seq2seq_dataset(), callbacks=[callback]).train()
    assert callback.pruner.adapter_factors  # the LoRA factors of removed groups are held at zero
    batch = {k: torch.tensor(v) for k, v in seq2seq_dataset(4, seed=1)[:4].items()}
    sizes, _ = merge_shrink_reload(model, callback.pruner, batch, tmp_path / "shrunk", AutoModelForSeq2SeqLM)
    assert {k: sizes[k] for k in keys} == {k: w // 2 for k, w in widths.items()}

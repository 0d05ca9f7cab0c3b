"""FishLegPruningTrainer / FishLegPruningCallback inside real transformers training on a tiny BERT."""

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from fls_hf import (
    FishLegPruningArguments,
    FishLegPruningCallback,
    FishLegPruningTrainer,
    RecipeError,
    load_recipe,
    sparsity_report,
)
from fls_hf.errors import PruningStateError

from helpers import tiny_bert

RECIPE = {
    "pruning": {
        "method": "fishleg",
        "init_sparsity": 0.3,
        "final_sparsity": 0.8,
        "start_step": 0,
        "end_step": 8,
        "update_frequency": 2,
        "obs_block_size": 8,
    },
    "curvature": {
        "damping": 1e-3,
        "num_batches": 2,
        "warmup_steps": 3,
        "refinement_steps": 2,
        "block_size": 8,
        "refine_every": 3,
        "init_examples": 16,  # the K-FAC warm start at every restart: 16 examples, not 256 (a test's seconds)
    },
}


def dataset(n=64, seq_len=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, seq_len), generator=g)
    labels = (ids[:, 0] > 32).long()  # learnable from the first token
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def training_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        eval_strategy="no",
    )
    return TrainingArguments(**{**settings, **overrides})


class SparsityTrace(TrainerCallback):
    """Records the targeted-layer sparsity after every optimizer step (runs after the pruning callback)."""

    def __init__(self, recipe):
        self.recipe, self.trace = load_recipe(recipe), []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trace.append((state.global_step, sparsity_report(model, self.recipe).global_sparsity))


def targeted_zeros_fraction(model, recipe):
    return sparsity_report(model, load_recipe(recipe)).global_sparsity


def test_trainer_reaches_exact_target_and_saved_model_reproduces_logits(tmp_path):
    model = tiny_bert()
    trace = SparsityTrace(RECIPE)
    trainer = FishLegPruningTrainer(
        model=model,
        args=training_args(tmp_path, eval_strategy="steps", eval_steps=6),
        recipe=RECIPE,
        train_dataset=dataset(),
        eval_dataset=dataset(16, seed=1),
        callbacks=[trace],
    )
    result = trainer.train()
    report = sparsity_report(model, trainer.recipe)
    assert report.zeros == round(0.8 * report.numel)
    assert [s for step, s in trace.trace if step in (2, 8)] == [
        pytest.approx(trace.trace[1][1]),
        pytest.approx(0.8, abs=1e-3),
    ]
    assert trace.trace[0][1] > 0.3 - 1e-3  # pruned at step 0 already (start_step 0, init 0.3)
    evaluation = trainer.evaluate()
    assert "eval_loss" in evaluation and "sparsity" not in evaluation and "sparsity" not in result.metrics
    assert not any("sparsity" in h for h in trainer.state.log_history if "eval_loss" in h or "train_runtime" in h)
    logged = [h for h in trainer.state.log_history if "sparsity" in h]
    assert logged and logged[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3) and "curvature_residual" in logged[-1]

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "recipe.yaml").is_file() and (out / "sparsity_report.json").is_file()
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert load_recipe(out / "recipe.yaml") == trainer.recipe
    batch = {k: torch.tensor(v) for k, v in dataset(4, seed=2)[:4].items() if k != "labels"}
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
    assert targeted_zeros_fraction(reloaded, RECIPE) == report.global_sparsity


def test_callback_on_stock_trainer(tmp_path):
    model = tiny_bert()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset())
    callback = FishLegPruningCallback(RECIPE)
    trainer.add_callback(callback)
    trainer.train()
    assert targeted_zeros_fraction(model, RECIPE) == pytest.approx(0.8, abs=1e-3)
    assert (tmp_path / "sparsity_report.json").is_file()  # written at train end
    assert callback.pruner.provider.steps_done >= 3


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    traces = []
    for accumulation, batch in ((1, 8), (4, 2)):
        trace = SparsityTrace(RECIPE)
        trainer = FishLegPruningTrainer(
            model=tiny_bert(),
            recipe=RECIPE,
            train_dataset=dataset(),
            callbacks=[trace],
            args=training_args(
                tmp_path / str(accumulation),
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
            ),
        )
        trainer.train()
        traces.append([(step, round(s, 4)) for step, s in trace.trace])
    assert [s for s, _ in traces[0]] == list(range(1, 13))
    assert [x[1] for x in traces[0]] == [x[1] for x in traces[1]]


def test_resume_continues_with_identical_masks_and_trajectory(tmp_path):
    def run(output, stop_at=None, resume=None):
        trace = SparsityTrace(RECIPE)
        callbacks = [trace]
        if stop_at:

            class Stop(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    control.should_training_stop = state.global_step >= stop_at

            callbacks.append(Stop())
        trainer = FishLegPruningTrainer(
            model=tiny_bert(),
            recipe=RECIPE,
            train_dataset=dataset(),
            callbacks=callbacks,
            args=training_args(output, save_strategy="steps", save_steps=4),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, trace.trace

    full, full_trace = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=6)  # "killed" after step 6; last checkpoint at step 4
    resumed, resumed_trace = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-4"))
    assert resumed_trace == full_trace[4:]
    assert resumed.pruner.masks.digest() == full.pruner.masks.digest()
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, msg=name)


def test_resume_without_pruner_state_is_refused(tmp_path):
    trainer = FishLegPruningTrainer(
        model=tiny_bert(),
        recipe=RECIPE,
        train_dataset=dataset(),
        args=training_args(tmp_path, save_strategy="steps", save_steps=4, max_steps=4),
    )
    trainer.train()
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-4" / "fls_pruner")
    again = FishLegPruningTrainer(
        model=tiny_bert(),
        recipe=RECIPE,
        train_dataset=dataset(),
        args=training_args(tmp_path, save_strategy="steps", save_steps=4, max_steps=8),
    )
    with pytest.raises(PruningStateError, match="no pruner state"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_arguments_parse_recipe_and_overrides(tmp_path):
    parser = HfArgumentParser(FishLegPruningArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--recipe",
            "recipes/gradual-unstructured-90.yaml",
            "--recipe_args",
            "pruning.final_sparsity=0.8",
            "curvature.damping=1e-4",
            "--use_cpu",
            "--report_to",
            "none",
        ]
    )
    trainer = FishLegPruningTrainer(model=tiny_bert(), args=args, train_dataset=dataset())
    assert trainer.recipe.pruning.final_sparsity == 0.8 and trainer.recipe.curvature.damping == 1e-4


def test_missing_recipe_is_an_early_error(tmp_path):
    with pytest.raises(RecipeError, match="needs a recipe"):
        FishLegPruningTrainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=dataset())


def test_bf16_mixed_precision_training(tmp_path):
    """Accelerate's bf16 autocast on CPU; curvature maths stays fp32 and finite."""
    model = tiny_bert()
    trainer = FishLegPruningTrainer(
        model=model, recipe=RECIPE, train_dataset=dataset(), args=training_args(tmp_path, bf16=True)
    )
    trainer.train()
    assert targeted_zeros_fraction(model, RECIPE) == pytest.approx(0.8, abs=1e-3)
    provider = trainer.pruner.provider
    assert all(torch.isfinite(provider.diag(name)).all() for name in provider.layers)
    assert provider.skipped_steps == 0


def test_oneshot_on_a_bf16_model_keeps_dtype():
    from fls_hf import oneshot

    model = tiny_bert().to(torch.bfloat16)
    batch = {k: torch.tensor(v) for k, v in dataset(8)[:8].items()}
    report = oneshot(model, [batch], RECIPE)
    assert report.zeros == round(0.8 * report.numel)
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16


def test_minimal_recipe_gets_a_gradual_schedule_over_the_run(tmp_path, caplog):
    """`init_sparsity` + `final_sparsity` and nothing else: prune over the first 3/4 of max_steps, then recover."""
    minimal = {"pruning": {"method": "magnitude", "init_sparsity": 0.3, "final_sparsity": 0.8}}
    trace = SparsityTrace(minimal)
    trainer = FishLegPruningTrainer(
        model=tiny_bert(),
        recipe=minimal,
        train_dataset=dataset(),
        callbacks=[trace],
        args=training_args(tmp_path, max_steps=20),
    )
    with caplog.at_level("INFO", logger="fls_hf"):
        trainer.train()
    pruning = trainer.recipe.pruning
    assert (pruning.start_step, pruning.end_step, pruning.update_frequency) == (0, 15, 1)
    assert sum("sets no `pruning.end_step`" in r.getMessage() for r in caplog.records) == 1
    sparsity = dict(trace.trace)
    assert sparsity[1] == pytest.approx(0.3 + (0.8 - 0.3) * (1 - (1 - 1 / 15) ** 3), abs=2e-3)  # cubic, from init
    assert sparsity[10] < 0.8 - 5e-3 and sparsity[15] == pytest.approx(0.8, abs=1e-3) and sparsity[20] == sparsity[15]
    assert load_recipe(tmp_path / "recipe.yaml").pruning.end_step == 15  # the saved recipe says what ran


def test_gradual_kfac_obc_in_the_trainer_reaches_the_target_with_rounds_and_resumes(tmp_path):
    """The issue-17 rule during fine-tuning: K-FAC re-taken at every pruning step, OBC in 2 rounds; the pruned
    weights stay at zero through the optimizer steps, and a resumed run ends with the same masks."""
    recipe = {
        "pruning": {
            "method": "kfac",
            "compensation": "obc",
            "obc_rounds": 2,
            "init_sparsity": 0.3,
            "final_sparsity": 0.7,
            "start_step": 0,
            "end_step": 6,
            "update_frequency": 3,
        },
        "curvature": {"damping": 1e-4, "num_batches": 2, "num_examples": 8},
    }

    def run(out, **kwargs):
        model = tiny_bert()
        args = training_args(out, max_steps=10, save_strategy="steps", save_steps=4)
        trainer = FishLegPruningTrainer(model=model, args=args, recipe=recipe, train_dataset=dataset())
        trainer.train(**kwargs)
        return model, trainer

    model, trainer = run(tmp_path / "a")
    report = sparsity_report(model, trainer.recipe)
    assert report.zeros == round(0.7 * report.numel)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for name, adapter in trainer.pruner.layers.items():
        assert torch.all(adapter.weight_matrix()[~trainer.pruner.masks.keep_matrix(name)] == 0)
    resumed, again = run(tmp_path / "a", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert again.pruner.masks.digest() == trainer.pruner.masks.digest()


@pytest.mark.parametrize(
    ("num_examples", "end_step", "window", "from_training"),
    [
        (8, 6, 2, [0.0, 1.0, 1.0]),
        # a last pruning step off the grid (7, one step after 6): served by that one step when it is half the window
        (8, 7, 2, [0.0, 1.0, 1.0, 1.0]),
        # ... and by a pass when it is less; steps 3 and 6 come 3 steps after the previous: 3 of 4 serve
        (16, 7, 4, [0.0, 1.0, 1.0, 0.0]),
    ],
)
def test_kfac_statistics_from_the_training_steps_replace_the_passes_after_the_first(
    tmp_path, num_examples, end_step, window, from_training
):
    """`curvature.statistics: training`: each pruning step after the first takes Ā and G from the training steps
    before it (`num_examples` at batch 4, or every step since the previous pruning step where the schedule spaces
    them closer, down to half that); the target is reached exactly and no hook stays on the model."""
    recipe = {
        "pruning": {
            "method": "kfac",
            "init_sparsity": 0.3,
            "final_sparsity": 0.6,
            "start_step": 0,
            "end_step": end_step,
            "update_frequency": 3,
        },
        "curvature": {"num_batches": 2, "num_examples": num_examples, "statistics": "training"},
    }
    model = tiny_bert()
    args = training_args(tmp_path, max_steps=8)
    trainer = FishLegPruningTrainer(model=model, args=args, recipe=recipe, train_dataset=dataset())
    trainer.train()
    assert trainer.pruner.statistics_window == window
    assert [h["training_statistics"] for h in trainer.pruner.history] == from_training
    report = sparsity_report(model, trainer.recipe)
    assert report.zeros == round(0.6 * report.numel)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not trainer.pruner.training_statistics.attached
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_gradual_neuron_pruning_in_the_trainer_saves_a_smaller_model_plain_transformers_loads(tmp_path):
    """`pruning.mask_type: neurons`: every block loses the same share of FFN neurons along the schedule; `save_model`
    writes the shrunk model (config.intermediate_size halved) with the trained model's logits."""
    recipe = {
        "pruning": {
            "method": "kfac",
            "mask_type": "neurons",
            "global_sparsity": False,
            "init_sparsity": 0.25,
            "final_sparsity": 0.5,
            "start_step": 0,
            "end_step": 8,
            "update_frequency": 4,
        },
        "curvature": {"num_examples": 8, "num_batches": 2},
    }
    model = tiny_bert()
    trainer = FishLegPruningTrainer(model=model, args=training_args(tmp_path), recipe=recipe, train_dataset=dataset())
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert model.config.intermediate_size == 32  # the trained model keeps its shapes
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.intermediate_size == 16
    assert reloaded.bert.encoder.layer[1].output.dense.weight.shape == (16, 16)
    batch = {k: torch.tensor(v) for k, v in dataset(4, seed=2)[:4].items() if k != "labels"}
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    assert sparsity_report(model, trainer.recipe).global_sparsity == pytest.approx(0.5)


def test_bert_neurons_and_heads_in_the_trainer_shrink_the_ffn_and_save_heads_as_zeros(tmp_path, caplog):
    """`mask_type: neurons+heads` removes both in one run. BERT's heads cannot shrink (transformers takes its head
    size from the config): `save_model` cuts the FFN, keeps the heads' shapes with the removed heads' output-projection
    columns zero, says so, and the saved model gives the trained model's logits."""
    recipe = {
        "pruning": {
            "method": "kfac",
            "mask_type": "neurons+heads",
            "global_sparsity": False,
            "final_sparsity": 0.5,
            "head_sparsity": 0.5,
        },
        "curvature": {"num_examples": 8, "num_batches": 2},
    }
    model = tiny_bert()
    trainer = FishLegPruningTrainer(model=model, args=training_args(tmp_path), recipe=recipe, train_dataset=dataset())
    trainer.train()
    with caplog.at_level("WARNING", logger="fls_hf"):
        trainer.save_model(str(tmp_path / "saved"))
    assert "the removed heads stay in the saved model as zeros" in caplog.text
    assert "neurons stay" not in caplog.text
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert reloaded.config.intermediate_size == 16
    batch = {k: torch.tensor(v) for k, v in dataset(4, seed=2)[:4].items() if k != "labels"}
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    for layer in reloaded.bert.encoder.layer:  # 2 heads of 8: one removed per layer
        columns = layer.attention.output.dense.weight.reshape(16, 2, 8)
        assert sorted(bool((columns[:, h] == 0).all()) for h in range(2)) == [False, True]

"""Reliability on real tiny models: faults survived, bad inputs rejected, malicious files refused.

Tests marked `fault`, `bad_input` or `malicious` are counted in the summary line tests/conftest.py
prints at the end of the session; the unmarked ones check data edge cases that must simply work,
and what fls_hf's own source does (and never does) with pickles and remote code.
"""

from __future__ import annotations

import ast
import builtins
import copy
import json
import logging
import math
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertForSequenceClassification, Trainer, TrainerCallback

from fls_hf import FishLegPruningTrainer, load_recipe, oneshot
from fls_hf.compressed import WEIGHTS_FILE, load_compressed, save_compressed
from fls_hf.errors import CurvatureError, FlsError, PruningStateError, RecipeError, UnsupportedModuleError
from fls_hf.pruning.pruner import STATE_META, STATE_TENSORS, Pruner
from fls_hf.recipe import parse_overrides

from helpers import tiny_bert, tiny_gpt2, token_batches
from test_trainer import RECIPE, SparsityTrace, dataset, training_args

REPO = Path(__file__).resolve().parents[1]
QUERY = "bert.encoder.layer.0.attention.self.query"
FAULT_STEP = (
    5  # RECIPE prunes at steps 0, 2, 4, 6, 8 and refines at 3, 6, 9: nothing but the optimizer moves weights at 5
)
DAMPING = 1e-3
CURVATURE = {
    "fishleg": {"warmup_steps": 3, "block_size": 8, "init_examples": 16},
    "magnitude": {},
    "diagonal_fisher": {"num_grads": 8, "fisher_labels": "sampled"},
    "block_fisher": {"num_grads": 8, "block_size": 8, "fisher_labels": "sampled"},
}


def recipe(method="fishleg", sparsity=0.5, **curvature):
    return {
        "pruning": {"method": method, "final_sparsity": sparsity, "obs_block_size": 8},
        "curvature": {"damping": DAMPING, "num_batches": 2, **CURVATURE[method], **curvature},
    }


def unlabelled(batches):
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]


def assert_pruned_cleanly(model, pruner, sparsity):
    """Finite weights and curvature, exact global sparsity, pruned weights exactly 0."""
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(pruner.provider.diag(name)).all() for name in pruner.layers)
    assert pruner.masks.num_pruned() == math.floor(sparsity * pruner.masks.numel() + 0.5)
    for name, adapter in pruner.layers.items():
        assert (adapter.weight[~pruner.masks.keep(name)] == 0).all(), name


# --------------------------------------------------------------------------- faults: training gradients
class GradientFault(TrainerCallback):
    """During optimizer step `step`, the training backward gives `module`'s weight a gradient full of `value`.

    A real tensor hook on the weight, active in training mode only (curvature passes run in eval mode).
    """

    def __init__(self, module: str, step: int, value: float) -> None:
        self.module, self.step, self.value = module, step, value
        self.handle, self.fired = None, 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:

            def hook(grad):
                if not model.training:
                    return grad
                self.fired += 1
                return torch.full_like(grad, self.value)

            self.handle = model.get_submodule(self.module).weight.register_hook(hook)

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class Snapshots(TrainerCallback):
    """Every parameter after the optimizer steps in `steps` (taken after the pruning callback ran)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.params = steps, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.params[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def clean_trace(tmp_path_factory):
    trace = SparsityTrace(RECIPE)
    FishLegPruningTrainer(
        model=tiny_bert(),
        recipe=RECIPE,
        train_dataset=dataset(),
        callbacks=[trace],
        args=training_args(tmp_path_factory.mktemp("clean")),
    ).train()
    return trace.trace


@pytest.mark.fault
@pytest.mark.parametrize(
    ("value", "max_grad_norm"), [(float("nan"), 1.0), (float("inf"), 0.0)], ids=["nan-clipped", "inf-unclipped"]
)
def test_non_finite_training_gradient_skips_the_update(tmp_path, caplog, clean_trace, value, max_grad_norm):
    fault, snapshots, trace = (
        GradientFault(QUERY, FAULT_STEP, value),
        Snapshots({FAULT_STEP - 1, FAULT_STEP}),
        SparsityTrace(RECIPE),
    )
    trainer = FishLegPruningTrainer(
        model=tiny_bert(),
        recipe=RECIPE,
        train_dataset=dataset(),
        callbacks=[fault, snapshots, trace],
        args=training_args(tmp_path, max_grad_norm=max_grad_norm),
    )
    with caplog.at_level(logging.WARNING, logger="fls_hf"):
        trainer.train()

    assert fault.fired == 1 and trainer.state.global_step == 12
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(
        torch.isfinite(t).all() for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    before, after = snapshots.params[FAULT_STEP - 1], snapshots.params[FAULT_STEP]
    assert all(torch.equal(after[n], before[n]) for n in before), "the faulty update must be skipped, not applied"
    assert trace.trace == clean_trace  # same sparsity after every optimizer step
    masks = trainer.pruner.masks
    assert masks.num_pruned() == round(0.8 * masks.numel())
    assert all((a.weight[~masks.keep(n)] == 0).all() for n, a in trainer.pruner.layers.items())

    # Where the Trainer's gradient-norm pass scales every gradient (clipping on; with clipping off, accelerate
    # < 1.16 ran it too) the fault has spread to all 12 targeted modules by the time the callback looks, and they
    # are all named (4, then "8 more"). With clipping off the Trainer still measures the norm, by
    # `clip_grad_norm_(params, inf)`; accelerate 1.16's `_clip_grad_norm_dtensor_aware` skips the scaling for an
    # infinite max_norm (read in its source), so the gradients stay as they were and the one faulty module is named.
    warnings = [r.getMessage() for r in caplog.records if r.name == "fls_hf" and r.levelno == logging.WARNING]
    spread = (
        f"{QUERY}, bert.encoder.layer.0.attention.self.value and 8 more at optimizer step {FAULT_STEP}; "
        "update skipped (1 so far)"
    )
    alone = f"module(s) {QUERY} at optimizer step {FAULT_STEP}; update skipped (1 so far)"
    expected = (spread,) if max_grad_norm > 0 else (spread, alone)
    assert any(e in m for m in warnings for e in expected), warnings
    assert any("1 optimizer update(s) skipped for non-finite gradients" in m for m in warnings)
    assert trainer.pruner.skipped_steps == 1
    assert [h["skipped_non_finite_steps"] for h in trainer.state.log_history if "skipped_non_finite_steps" in h][
        -1
    ] == 1


def test_the_injected_fault_corrupts_an_unguarded_trainer(tmp_path):
    """The same fault without fls_hf reaches the weights: the test above guards against something real."""
    fault = GradientFault(QUERY, 2, float("nan"))
    trainer = Trainer(
        model=tiny_bert(), args=training_args(tmp_path, max_steps=2), train_dataset=dataset(), callbacks=[fault]
    )
    trainer.train()
    assert fault.fired == 1 and not torch.isfinite(trainer.model.get_submodule(QUERY).weight).all()


# --------------------------------------------------------------------------- faults: curvature
def product_fault(module: nn.Module):
    """NaN in `module`'s share of every Fisher-vector product: a tensor hook on its weight that spoils the
    gradient of the product's last pass (no graph kept) and leaves the double-backward pass alone."""
    return module.weight.register_hook(lambda g: g if g.requires_grad else torch.full_like(g, float("nan")))


@pytest.mark.fault
def test_non_finite_fisher_product_of_one_module_spares_the_others():
    model, batches = tiny_bert(), token_batches(n_batches=2)
    pruner = Pruner(model, recipe(warmup_steps=4))
    handle = product_fault(model.get_submodule(QUERY))
    try:
        with pytest.warns(RuntimeWarning, match=rf"FishLeg aux step skipped for {re.escape(QUERY)}: non-finite values"):
            pruner.prune_to(model, 0.5, batches)
    finally:
        handle.remove()
    provider = pruner.provider
    assert provider.steps_done == 4 and provider.skipped_steps == 4  # the other layers learned at every step
    assert math.isfinite(pruner.last_diagnostics["residual"]) and math.isfinite(pruner.last_diagnostics["aux_loss"])
    assert_pruned_cleanly(model, pruner, 0.5)

    reference_model = tiny_bert()
    reference = Pruner(reference_model, recipe(warmup_steps=0))  # the same K-FAC warm start, no aux step
    reference.provider.ready(reference_model, batches)
    for name, structure in provider.structures.items():
        same = all(
            torch.equal(a, b) for a, b in zip(structure.parameters(), reference.provider.structures[name].parameters())
        )
        assert same == (name == QUERY), name  # QUERY kept its warm start; every other Q moved


def nan_example_batches():
    """Calibration batches given as `inputs_embeds`; one example of the first holds a NaN (an overflowed activation)."""
    embeddings = tiny_bert().bert.embeddings.word_embeddings
    batches = []
    for b in token_batches(n_batches=2):
        with torch.no_grad():
            batches.append({"inputs_embeds": embeddings(b["input_ids"]), "attention_mask": b["attention_mask"]})
    batches[0]["inputs_embeds"][1, 0, 0] = float("nan")
    return batches


@pytest.mark.fault
@pytest.mark.parametrize("init", ["kfac", "diagonal"])
def test_non_finite_warm_start_falls_back_to_the_identity_start(init):
    """NaN statistics must not become a NaN Q₀: every layer starts from Q = I/γ, so (without aux steps) the
    pruning is exactly magnitude pruning's."""
    model, batches = tiny_bert(), nan_example_batches()
    pruner = Pruner(model, recipe(warmup_steps=0, init=init))
    with pytest.warns(
        RuntimeWarning, match=rf"`curvature.init: {init}`\) gave non-finite statistics for .*{re.escape(QUERY)}"
    ):
        pruner.prune_to(model, 0.5, batches)
    assert_pruned_cleanly(model, pruner, 0.5)
    for name in pruner.layers:
        torch.testing.assert_close(pruner.provider.diag(name), torch.full(pruner.layers[name].shape, 1 / DAMPING))

    magnitude_model = tiny_bert()
    magnitude = Pruner(magnitude_model, recipe("magnitude"))
    magnitude.prune_to(magnitude_model, 0.5, batches)
    assert pruner.masks.digest() == magnitude.masks.digest()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), magnitude_model.parameters()))


@pytest.mark.fault
def test_non_finite_curvature_at_pruning_time_writes_no_nan():
    """A Q with NaN entries (memory corruption, a bad refinement): those weights are pruned last and the
    layer gets no compensation, so nothing non-finite reaches its weights or masks."""
    model, batches = tiny_bert(), token_batches(n_batches=2)
    pruner = Pruner(model, recipe(warmup_steps=2, refinement_steps=0, rewarm=False))
    pruner.prune_to(model, 0.3, batches)
    with torch.no_grad():
        pruner.provider.structures[QUERY].log_s[0, :3] = float("nan")
    layer = pruner.layers[QUERY]
    before = layer.weight_matrix().clone()
    with pytest.warns(RuntimeWarning, match=rf"module `{re.escape(QUERY)}`: diag Q is not finite at 3 of 256 weights"):
        pruner.prune_to(model, 0.6, batches)
    keep = pruner.masks.keep_matrix(QUERY)
    assert keep[0, :3].all()  # most salient: kept
    assert torch.equal(layer.weight_matrix(), before.masked_fill(~keep, 0))  # zeroed, not compensated
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert pruner.masks.num_pruned() == math.floor(0.6 * pruner.masks.numel() + 0.5)


@pytest.mark.fault
def test_rewarm_replaces_a_corrupted_q_before_the_next_pruning_step():
    """With `rewarm` (the default) the next pruning step starts from fresh K-FAC statistics: NaN entries
    left in Q by a bad refinement are gone before any saliency is read."""
    model, batches = tiny_bert(), token_batches(n_batches=2)
    pruner = Pruner(model, recipe(warmup_steps=2, refinement_steps=0))
    pruner.prune_to(model, 0.3, batches)
    with torch.no_grad():
        pruner.provider.structures[QUERY].log_s[0, :3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pruner.prune_to(model, 0.6, batches)
    assert torch.isfinite(pruner.provider.structures[QUERY].log_s).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert pruner.masks.num_pruned() == math.floor(0.6 * pruner.masks.numel() + 0.5)


# --------------------------------------------------------------------------- data edge cases
def lm_labelled(batches):
    return [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches]


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_calibration_without_labels_prunes_as_with_them(make):
    """The true Fisher samples labels from the model, so data labels are never needed (nor read)."""
    batches = token_batches(n_batches=2) if make is tiny_bert else lm_labelled(token_batches(n_batches=2))
    labelled_model, unlabelled_model = make(), make()
    labelled, bare = Pruner(labelled_model, recipe()), Pruner(unlabelled_model, recipe())
    labelled.prune_to(labelled_model, 0.5, batches)
    bare.prune_to(unlabelled_model, 0.5, unlabelled(batches))
    assert_pruned_cleanly(unlabelled_model, bare, 0.5)
    assert bare.masks.digest() == labelled.masks.digest()
    assert all(torch.equal(a, b) for a, b in zip(unlabelled_model.parameters(), labelled_model.parameters()))


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("method", ["fishleg", "block_fisher"])
def test_sequence_length_one(make, method):
    batches = unlabelled(token_batches(n_batches=2, seq_len=1))
    for b in batches:
        b["attention_mask"].fill_(1)
    model = make()
    pruner = Pruner(model, recipe(method))
    pruner.prune_to(model, 0.5, batches)
    assert_pruned_cleanly(model, pruner, 0.5)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize(("method", "init"), [("fishleg", "kfac"), ("fishleg", "diagonal"), ("block_fisher", None)])
def test_all_padding_rows_give_finite_curvature(make, method, init):
    batches = unlabelled(token_batches(n_batches=2))
    for b in batches:
        b["attention_mask"][1::2] = 0  # rows 1 and 3: nothing but padding
        b["input_ids"][1::2] = 0
    model = make()
    pruner = Pruner(model, recipe(method, **({"init": init} if init else {})))
    pruner.prune_to(model, 0.5, batches)
    assert_pruned_cleanly(model, pruner, 0.5)
    assert all(math.isfinite(v) for v in pruner.last_diagnostics.values())


@pytest.mark.bad_input
def test_calibration_data_with_only_padding_is_refused_for_kfac():
    batches = unlabelled(token_batches(n_batches=2))
    for b in batches:
        b["attention_mask"].zero_()
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        CurvatureError, match=r"calibration batches hold no real token \(every `attention_mask` entry is 0\)"
    ):
        oneshot(model, batches, recipe())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.bad_input
@pytest.mark.parametrize("method", ["fishleg", "diagonal_fisher", "block_fisher"])
def test_empty_calibration_dataloader_is_an_early_error(method):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FlsError, match="empty calibration"):
        oneshot(model, [], recipe(method))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- no supported layer
class EmbeddingOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Embedding(16, 8), nn.LayerNorm(8)

    def forward(self, input_ids):
        return self.norm(self.embed(input_ids))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("make", "pruning", "error", "match"),
    [
        (
            EmbeddingOnly,
            {},
            RecipeError,
            r"`pruning\.targets` / `pruning\.ignore` leave no supported layer in EmbeddingOnly",
        ),
        (
            tiny_bert,
            {"targets": ["re:.*query"], "ignore": ["re:.*"]},
            RecipeError,
            r"`pruning\.targets` / `pruning\.ignore` leave no supported layer in BertForSequenceClassification",
        ),
        (
            tiny_bert,
            {"targets": ["re:.*quary"]},
            RecipeError,
            r"`pruning\.targets` pattern 're:\.\*quary' matches no module of BertForSequenceClassification; example "
            r"module names: bert\.",
        ),
        (
            tiny_bert,
            {"targets": ["re:.*layer\\.0\\.output\\.LayerNorm"]},
            UnsupportedModuleError,
            r"module `bert\.encoder\.layer\.0\.output\.LayerNorm` of type torch\.nn\.modules\.normalization\.LayerNorm "
            r"is targeted",
        ),
    ],
    ids=["embedding-only model", "everything ignored", "target matches nothing", "unsupported target type"],
)
def test_no_supported_layer_is_a_clear_error(make, pruning, error, match):
    source = recipe("magnitude")
    source["pruning"].update(pruning)
    with pytest.raises(error, match=match):
        Pruner(make(), source)


# --------------------------------------------------------------------------- malicious files
class Payload:
    """Unpickling this creates `marker`: proof that the file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.malicious
@pytest.mark.parametrize("where", ["string", "file", "override"])
def test_recipe_with_a_code_running_tag_is_refused(tmp_path, where):
    marker = tmp_path / "executed"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    with pytest.raises(
        RecipeError,
        match=r"uses a YAML tag that is not plain data \(could not determine a constructor for the tag "
        r"'tag:yaml\.org,2002:python/object/apply:os\.system'\)",
    ):
        if where == "override":
            parse_overrides([f"pruning.final_sparsity={tag}"])
        elif where == "file":
            (tmp_path / "recipe.yaml").write_text(f"pruning: {tag}\n")
            load_recipe(tmp_path / "recipe.yaml")
        else:
            load_recipe(f"pruning:\n  method: {tag}\n")
    assert not marker.exists()


@pytest.mark.malicious
def test_pickle_in_place_of_a_compressed_checkpoint_is_refused(tmp_path):
    model = tiny_bert()
    save_compressed(model, tmp_path, recipe("magnitude"))
    marker = tmp_path / "executed"
    (tmp_path / WEIGHTS_FILE).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(PruningStateError, match="unreadable or truncated"):
        load_compressed(BertForSequenceClassification, tmp_path)
    assert not marker.exists()


@pytest.mark.malicious
def test_pickle_in_place_of_the_pruner_metadata_is_refused(tmp_path):
    model = tiny_bert()
    Pruner(model, recipe("magnitude")).save(tmp_path)
    marker = tmp_path / "executed"
    (tmp_path / STATE_META).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(PruningStateError, match="unreadable or truncated"):
        Pruner(tiny_bert(), recipe("magnitude")).load(tmp_path)
    assert not marker.exists()


@pytest.mark.malicious
def test_compressed_checkpoint_asking_for_remote_code_is_refused(tmp_path, monkeypatch):
    """Even for a user who would answer yes to transformers' "run the custom code?" prompt."""
    save_compressed(tiny_bert(), tmp_path, recipe("magnitude"))
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "executed"
    (tmp_path / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n\n\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    monkeypatch.setattr(builtins, "input", lambda *args: "y")
    with pytest.raises(
        PruningStateError,
        match=r"config\.json has an `auto_map` \(custom modeling code\); fls_hf never runs remote code",
    ):
        load_compressed(BertForSequenceClassification, tmp_path)
    assert not marker.exists()


@pytest.mark.bad_input
def test_pruner_state_with_non_finite_curvature_is_refused(tmp_path):
    model = tiny_bert()
    pruner = Pruner(model, recipe(warmup_steps=1))
    pruner.prune_to(model, 0.5, token_batches(n_batches=2))
    pruner.save(tmp_path)
    tensors = load_file(str(tmp_path / STATE_TENSORS))
    key = f"curvature/{QUERY}/log_s"
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / STATE_TENSORS))
    fresh_model = tiny_bert()
    fresh = Pruner(fresh_model, recipe(warmup_steps=1))
    with pytest.raises(PruningStateError, match=rf"non-finite curvature values in \['{re.escape(QUERY)}/log_s'\]"):
        fresh.load(tmp_path)
    assert fresh.masks.num_pruned() == 0  # refused before anything was applied


# --------------------------------------------------------------------------- what fls_hf's code does
def python_files(*folders: str) -> list[Path]:
    found = (p for folder in folders for p in (REPO / folder).rglob("*.py"))
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(REPO).parts))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            yield (
                node,
                (ast.unparse(func.value) + "." + func.attr if isinstance(func, ast.Attribute) else ast.unparse(func)),
            )


def test_fls_hf_never_unpickles_or_runs_code_from_files():
    forbidden_calls = {
        "torch.load",
        "pickle.load",
        "pickle.loads",
        "yaml.load",
        "yaml.unsafe_load",
        "yaml.full_load",
        "np.load",
        "numpy.load",
        "eval",
        "exec",
    }
    forbidden_modules = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
    found = []
    for path in python_files("fls_hf"):
        tree = ast.parse(path.read_text())
        found += [f"{path.name}: {name}" for _, name in calls(tree) if name in forbidden_calls]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path.name}: import {m}" for m in modules if m.split(".")[0] in forbidden_modules]
    assert not found


def test_trust_remote_code_stays_off():
    """No `trust_remote_code=True` anywhere; fls_hf passes it only as False; the example's flag defaults to False."""
    enabled, package_values = [], []
    for path in python_files("fls_hf", "examples"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                enabled += [path.name] if isinstance(node.value, ast.Constant) and node.value.value is True else []
                package_values += [ast.unparse(node.value)] if "fls_hf" in path.parts else []
            if isinstance(node, ast.Dict):
                enabled += [
                    path.name
                    for k, v in zip(node.keys, node.values)
                    if isinstance(k, ast.Constant)
                    and k.value == "trust_remote_code"
                    and isinstance(v, ast.Constant)
                    and v.value is True
                ]
    assert not enabled and set(package_values) <= {"False"}
    example = ast.parse((REPO / "examples" / "text_classification.py").read_text())
    defaults = [
        ast.unparse(n.value)
        for n in ast.walk(example)
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "trust_remote_code"
    ]
    assert len(defaults) == 1 and defaults[0].startswith("field(default=False")


def test_saved_model_carries_training_args_as_json_and_loading_needs_no_pickle(tmp_path, monkeypatch):
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hub_token="hf_not_a_real_secret")
    source = recipe("magnitude")
    trainer = FishLegPruningTrainer(model=tiny_bert(), recipe=source, train_dataset=dataset(), args=args)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    for folder in (tmp_path / "saved", tmp_path / "checkpoint-2"):
        text = (folder / "training_args.json").read_text()
        assert json.loads(text) == json.loads(args.to_json_string()) and json.loads(text)["max_steps"] == 2
        assert "hf_not_a_real_secret" not in text
        assert (folder / "training_args.bin").is_file()  # transformers' own pickle: written, never read by fls_hf

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, refuse)
    resumed = Pruner(tiny_bert(), source)
    resumed.load(tmp_path / "checkpoint-2" / "fls_pruner")
    assert resumed.masks.digest() == trainer.pruner.masks.digest()
    assert load_recipe(tmp_path / "saved" / "recipe.yaml") == trainer.recipe

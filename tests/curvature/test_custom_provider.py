"""A method of one's own: a minimal provider registered under a new name runs through `oneshot` and the Trainer.

The Pruner may only use the abstract interface: this provider has nothing FishLeg has (no `prepare`,
`refine`, `restart`, `refines`, `rewarm`...), records which verbs it was driven with, and its Q (random scales
drawn from the base class's seeded generator) sets which weights go, so the test sees it was used.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field

import pytest
import torch

from fls_hf import FishLegPruningTrainer, oneshot, sparsity_report
from fls_hf.curvature import CurvatureConfig, CurvatureProvider, base, register_curvature
from fls_hf.pruning import Pruner
from fls_hf.pruning import pruner as pruner_module

from helpers import tiny_bert, token_batches
from test_trainer import dataset, training_args


@dataclass
class RandomScaleConfig(CurvatureConfig):
    """`curvature:` of the test method: one key of its own."""

    spread: float = field(
        default=10.0, metadata={"help": "Q_qq = 1/(γ r_q), r_q uniform in [1, spread] at each `ready`."}
    )


def random_scales(layers, generator, spread):
    return {name: 1 + (spread - 1) * torch.rand(a.shape, generator=generator) for name, a in layers.items()}


class RandomScaleProvider(CurvatureProvider):
    """Q = diag 1/(γ r) with r drawn at each `ready` from the provider's seeded generator: OBS saliency γ r w²/2."""

    config_class = RandomScaleConfig

    def __init__(self, layers, config):
        super().__init__(layers, config)
        self.r = {name: torch.ones(a.shape) for name, a in self.layers.items()}
        self.calls: list[tuple[str, int | None]] = []

    def ready(self, model, batches):
        next(iter(batches))  # it may read data; it must not need any
        self.r = random_scales(self.layers, self.generator, self.config.spread)
        self.calls.append(("ready", None))
        return {"aux_loss": 1.0}

    def on_optimizer_step(self, model, batches, step):
        self.calls.append(("step", step))
        return {}

    def diag(self, name):
        return 1.0 / (self.damping * self.r[name])

    def matvec(self, name, vector):
        return self.diag(name) * vector

    def state_tensors(self):
        return dict(self.r)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(base, "_CONFIGS", dict(base._CONFIGS))
    monkeypatch.setattr(base, "_PROVIDERS", dict(base._PROVIDERS))
    register_curvature("random_scale", RandomScaleProvider)
    return "random_scale"


def recipe(method, **pruning):
    return {
        "pruning": {"method": method, "final_sparsity": 0.5, "compensation": "none", **pruning},
        "curvature": {"spread": 10.0},
    }


def test_oneshot_with_a_custom_provider_prunes_by_its_curvature(registered):
    model, reference = tiny_bert(), tiny_bert()
    report = oneshot(model, token_batches(n_batches=1), recipe(registered))
    assert report.zeros == round(0.5 * report.numel)
    # the expected masks: one global ranking of γ r w² over every targeted layer, r from the same seeded draws
    layers = Pruner(reference, recipe(registered)).layers
    r = random_scales(layers, torch.Generator().manual_seed(0), 10.0)
    scores = torch.cat([(r[n] * a.weight_matrix() ** 2).reshape(-1) for n, a in layers.items()])
    threshold = scores.sort().values[round(0.5 * scores.numel()) - 1]
    modules = dict(model.named_modules())
    for name, adapter in layers.items():
        expected_pruned = (r[name] * adapter.weight_matrix() ** 2) <= threshold
        assert torch.equal(modules[name].weight.detach() == 0, expected_pruned), name


def test_gradual_trainer_run_drives_only_the_interface(registered, tmp_path):
    spec = recipe(registered, init_sparsity=0.2, final_sparsity=0.6, start_step=0, end_step=6, update_frequency=2)
    trainer = FishLegPruningTrainer(
        model=tiny_bert(), recipe=spec, train_dataset=dataset(), args=training_args(tmp_path, max_steps=8)
    )
    trainer.train()
    report = sparsity_report(trainer.model, trainer.recipe)
    assert report.zeros == round(0.6 * report.numel)
    calls = trainer.pruner.provider.calls
    readies = [i for i, (verb, _) in enumerate(calls) if verb == "ready"]
    steps = [s for verb, s in calls if verb == "step"]
    assert len(readies) == 4  # pruning at steps 0, 2, 4, 6
    assert steps == [1, 3, 5, 7, 8]  # every optimizer step that did not prune
    assert any("curvature_aux_loss" in h for h in trainer.state.log_history)


def test_the_pruner_reads_only_the_provider_interface():
    """Every `provider.<name>` the Pruner and the surgeon touch is part of `CurvatureProvider` itself."""
    interface = {n for n, _ in inspect.getmembers(CurvatureProvider) if not n.startswith("_")} | {
        "layers",
        "config",
        "keep",
        "shards",  # instance attributes set in CurvatureProvider.__init__
    }
    from fls_hf.pruning import surgeon

    used = set()
    for module in (pruner_module, surgeon):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "provider"
            ):
                used.add(node.attr)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "provider":
                used.add(node.attr)
    assert used and used <= interface, sorted(used - interface)

"""The provider contract, checked for every registered curvature method (and every FishLeg structure).

On a tiny MLP (two Linear layers with biases), after `ready`:
- `matvec` is a linear map whose explicit matrix (built column by column) is symmetric positive definite;
- `diag` is that matrix's diagonal, `blocks(name, B)` its within-row blocks, `matvec` of a random V its product;
- `state_dict` survives a safetensors file and a fresh provider answers the same;
- `estimated_bytes` (known before allocating) covers what the state tensors hold.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file, save_file

from fls_hf.curvature import config_class_for, provider_class_for, registered_methods
from fls_hf.curvature.fishleg import STRUCTURES
from fls_hf.model import from_row_blocks, row_blocks

from helpers import mlp_problem

# Small settings for whichever keys a method's config has (so a newly registered method is covered too).
SMALL = {
    "damping": 1e-2,
    "num_batches": 2,
    "num_grads": 8,
    "block_size": 4,
    "warmup_steps": 2,
    "init_examples": 8,
    "fisher_labels": "sampled",
    "likelihood": "categorical",
}
CASES = [(m, {}) for m in registered_methods() if m != "fishleg"] + [("fishleg", {"structure": s}) for s in STRUCTURES]


def problem():
    return mlp_problem(3)


def provider_for(method: str, extra: dict, layers):
    config_class = config_class_for(method)
    known = {f.name for f in fields(config_class)}
    config = config_class(**{k: v for k, v in {**SMALL, **extra}.items() if k in known})
    return provider_class_for(method)(layers, config)


def explicit(provider, name: str) -> torch.Tensor:
    """Q restricted to layer `name`'s weights, (rows·cols)², from one matvec per coordinate."""
    rows, cols = provider.layers[name].shape
    columns = []
    for k in range(rows * cols):
        e = torch.zeros(rows * cols)
        e[k] = 1.0
        columns.append(provider.matvec(name, e.view(rows, cols)).reshape(-1).double())
    return torch.stack(columns, dim=1)


@pytest.fixture(params=CASES, ids=[f"{m}-{e.get('structure', '')}".rstrip("-") for m, e in CASES])
def ready_provider(request):
    method, extra = request.param
    model, batches, layers = problem()
    provider = provider_for(method, extra, layers)
    provider.ready(model, batches)
    return method, extra, provider


def test_matvec_is_a_symmetric_positive_definite_map_read_consistently(ready_provider):
    _, _, provider = ready_provider
    g = torch.Generator().manual_seed(3)
    for name, adapter in provider.layers.items():
        rows, cols = adapter.shape
        q = explicit(provider, name)
        torch.testing.assert_close(q, q.T, rtol=1e-4, atol=1e-6 * q.abs().max().item())
        assert torch.linalg.eigvalsh((q + q.T) / 2).min() > 0
        torch.testing.assert_close(provider.diag(name).double().reshape(-1), q.diagonal(), rtol=1e-4, atol=0)
        v = torch.randn(rows, cols, generator=g)
        torch.testing.assert_close(
            provider.matvec(name, v).double().reshape(-1),
            q @ v.double().reshape(-1),
            rtol=1e-4,
            atol=1e-6 * q.abs().max().item(),
        )
        for block in (2, 3):  # entry (j, k) of block b is Q's entry between the two weights of that row block
            index = row_blocks(torch.arange(rows * cols, dtype=torch.float64).view(rows, cols) + 1, block).long() - 1
            valid = index >= 0
            safe = index.clamp_min(0)
            expected = q[safe[:, :, None], safe[:, None, :]] * (valid[:, :, None] & valid[:, None, :])
            torch.testing.assert_close(
                provider.blocks(name, block).double(), expected, rtol=1e-4, atol=1e-6 * q.abs().max().item()
            )
        assert from_row_blocks(row_blocks(v, 3), (rows, cols)).equal(v)


def test_state_dict_survives_a_safetensors_file(ready_provider, tmp_path):
    method, extra, provider = ready_provider
    state = provider.state_dict()
    save_file({k: v.contiguous() for k, v in state["tensors"].items()}, str(tmp_path / "state.safetensors"))
    _, _, layers = problem()
    fresh = provider_for(method, extra, layers)
    fresh.load_state_dict({"tensors": load_file(str(tmp_path / "state.safetensors")), "meta": state["meta"]})
    for name in provider.layers:
        torch.testing.assert_close(fresh.diag(name), provider.diag(name), rtol=0, atol=0)
        v = torch.ones(provider.layers[name].shape)
        torch.testing.assert_close(fresh.matvec(name, v), provider.matvec(name, v), rtol=0, atol=0)
    assert torch.equal(fresh.generator.get_state(), provider.generator.get_state())


def test_kfac_state_saved_before_the_input_means_loads_with_zero_means():
    """Checkpoints from before K-FAC kept μ = E[a] load: the means are zero (group OBS leaves the bias alone)."""
    model, batches, layers = problem()
    provider = provider_for("kfac", {}, layers)
    provider.ready(model, batches)
    tensors = {k: v for k, v in provider.state_dict()["tensors"].items() if not k.endswith("/input_mean")}
    fresh = provider_for("kfac", {}, layers)
    fresh.load_state_dict({"tensors": tensors, "meta": provider.state_meta()})
    for name in layers:
        assert bool(provider.row_model(name).input_mean.abs().sum() > 0)
        assert bool((fresh.row_model(name).input_mean == 0).all())
        torch.testing.assert_close(fresh.row_model(name).a_bar(), provider.row_model(name).a_bar(), rtol=0, atol=0)


def test_memory_estimate_covers_the_state(ready_provider):
    _, _, provider = ready_provider
    held = sum(t.numel() * t.element_size() for t in provider.state_tensors().values())
    assert provider.estimated_bytes() >= held
    assert provider.memory_bytes() >= held


def test_generator_lives_on_the_layers_device_and_draws_as_a_seeded_cpu_generator():
    _, _, layers = problem()
    provider = provider_for("kfac", {"seed": 5}, layers)
    assert provider.generator.device == next(iter(layers.values())).weight.device
    expected = torch.Generator().manual_seed(5)
    assert torch.equal(torch.randn(6, generator=provider.generator), torch.randn(6, generator=expected))


def test_rng_state_continues_restarts_or_warns_on_another_devices_state(caplog):
    _, _, layers = problem()
    provider = provider_for("kfac", {"seed": 3}, layers)
    torch.randn(4, generator=provider.generator)
    saved = provider.rng_state().clone()
    following = torch.randn(4, generator=provider.generator)
    provider.load_rng_state(saved)  # continue where the state was taken
    assert torch.equal(torch.randn(4, generator=provider.generator), following)
    provider.load_rng_state(None)  # restart from the seed
    assert torch.equal(
        torch.randn(4, generator=provider.generator), torch.randn(4, generator=torch.Generator().manual_seed(3))
    )
    provider.load_rng_state(torch.zeros(16, dtype=torch.uint8))  # a CUDA (Philox) state: cannot continue on CPU
    with caplog.at_level("WARNING", logger="fls_hf"):
        first = torch.randn(4, generator=provider.generator)
    assert "saved on another kind of device" in caplog.text
    assert torch.equal(first, torch.randn(4, generator=torch.Generator().manual_seed(3)))

"""Diagonal (OBD) and block (oBERT / WoodFisher) Fisher providers against explicit matrices."""

import pytest
import torch

from fls_hf.curvature import (
    BlockFisherConfig,
    BlockFisherProvider,
    DiagonalFisherConfig,
    DiagonalFisherProvider,
    GradientFisherProvider,
    provider_class_for,
)
from fls_hf.errors import CurvatureError
from fls_hf.fisher.gradients import per_example_gradients
from fls_hf.fisher.likelihoods import Categorical
from fls_hf.model.targets import resolve_targets

from helpers import mlp_problem, tiny_bert, token_batches

GAMMA, B, NUM_GRADS = 1e-2, 4, 10  # layer "0" is (5, 6), layer "2" is (3, 5): neither cols divisible by B


def problem():
    return mlp_problem(3)


def explicit_grads(model, batches, layers, keep=None):
    """(m, rows, cols) per layer: the first NUM_GRADS per-example gradients (checked against autograd elsewhere)."""
    grads = list(per_example_gradients(model, batches, layers, likelihood=Categorical(), keep=keep))
    return {n: torch.cat([g[n] for g in grads])[:NUM_GRADS] for n in layers}


def explicit_q(g):
    """Dense Q = blockdiag((γI + G_b/m)⁻¹) over (rows·cols) coordinates, blocks of B consecutive weights of a row."""
    m, rows, cols = g.shape
    q = torch.zeros(rows * cols, rows * cols, dtype=torch.float64)
    for r in range(rows):
        for start in range(0, cols, B):
            idx = [r * cols + c for c in range(start, min(start + B, cols))]
            vecs = g.reshape(m, -1)[:, idx].double()
            inv = torch.linalg.inv(GAMMA * torch.eye(B, dtype=torch.float64) + _pad(vecs.T @ vecs / m))
            q[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = inv[: len(idx), : len(idx)]
    return q


def _pad(matrix):
    out = torch.zeros(B, B, dtype=matrix.dtype)
    out[: matrix.shape[0], : matrix.shape[1]] = matrix
    return out


def block_provider(layers, **overrides):
    return BlockFisherProvider(
        layers, BlockFisherConfig(**{"damping": GAMMA, "num_grads": NUM_GRADS, "block_size": B, **overrides})
    )


def test_registered():
    assert provider_class_for("diagonal_fisher") is DiagonalFisherProvider
    assert provider_class_for("block_fisher") is BlockFisherProvider
    assert issubclass(BlockFisherProvider, GradientFisherProvider) and issubclass(
        DiagonalFisherProvider, GradientFisherProvider
    )


def test_diagonal_is_obd():
    model, batches, layers = problem()
    provider = DiagonalFisherProvider(layers, DiagonalFisherConfig(damping=GAMMA, num_grads=NUM_GRADS))
    assert torch.equal(provider.diag("0"), torch.full((5, 6), 1 / GAMMA))
    assert provider.ready(model, batches) == {"examples": float(NUM_GRADS)}
    for name, g in explicit_grads(model, batches, layers).items():
        expected = 1.0 / (sum(g[n] ** 2 for n in range(NUM_GRADS)) / NUM_GRADS + GAMMA)
        torch.testing.assert_close(provider.diag(name), expected)
        v = torch.randn(layers[name].shape)
        torch.testing.assert_close(provider.matvec(name, v), expected * v)


@pytest.mark.parametrize("name", ["0", "2"])
def test_block_inverse_matvec_diag_blocks_match_explicit(name):
    model, batches, layers = problem()
    provider = block_provider(layers)
    provider.ready(model, batches)
    rows, cols = layers[name].shape
    q = explicit_q(explicit_grads(model, batches, layers)[name]).float()
    v = torch.randn(rows, cols)
    torch.testing.assert_close(provider.matvec(name, v).reshape(-1), q @ v.reshape(-1), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(provider.diag(name).reshape(-1), q.diagonal(), atol=1e-3, rtol=1e-4)
    stored = provider.state_tensors()[name]
    assert stored.shape == (rows * 2, B, B) and provider.memory_bytes() == (10 + 6) * B * B * 4
    padded = stored.reshape(rows, 2, B, B)[:, -1]  # last block of each row: cols 4..5 real, the rest padding
    pad_from = cols - B
    torch.testing.assert_close(padded[:, pad_from:, pad_from:], torch.eye(B - pad_from).expand(rows, -1, -1) / GAMMA)
    assert (padded[:, :pad_from, pad_from:] == 0).all()
    for size in (B, 2, 3, 8):
        expected = torch.zeros(rows, -(-cols // size), size, size)
        for r in range(rows):
            for k in range(-(-cols // size)):
                c = [k * size + i for i in range(size) if k * size + i < cols]
                idx = torch.tensor([r * cols + x for x in c])
                expected[r, k, : len(c), : len(c)] = q[idx[:, None], idx[None, :]]
        torch.testing.assert_close(provider.blocks(name, size), expected.reshape(-1, size, size), atol=1e-3, rtol=1e-4)
    valid = (torch.arange(2 * B) < cols).float().reshape(2, B)
    torch.testing.assert_close(
        provider.blocks(name, B), stored * (valid[:, :, None] * valid[:, None, :]).repeat(rows, 1, 1)
    )


def test_masked_coordinates_are_uncoupled():
    model, batches, layers = problem()
    keep = torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    provider = block_provider(layers)
    provider.mask("0", keep)
    provider.ready(model, batches)
    q = explicit_q(explicit_grads(model, batches, layers, keep={"0": keep})["0"]).float()
    pruned = (~keep).reshape(-1)
    assert (explicit_grads(model, batches, layers, keep={"0": keep})["0"][:, ~keep] == 0).all()
    torch.testing.assert_close(provider.diag("0")[~keep], torch.full((int(pruned.sum()),), 1 / GAMMA))
    e = torch.zeros(30)
    e[pruned.nonzero()[0]] = 1.0
    torch.testing.assert_close(provider.matvec("0", e.reshape(5, 6)).reshape(-1), e / GAMMA, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        provider.matvec("0", keep.float()).reshape(-1), q @ keep.float().reshape(-1), atol=1e-3, rtol=1e-4
    )
    diagonal = DiagonalFisherProvider(layers, DiagonalFisherConfig(damping=GAMMA, num_grads=NUM_GRADS))
    diagonal.ready(model, batches)
    diagonal.mask("0", keep)
    assert (diagonal.diag("0")[~keep] == 1 / GAMMA).all() and (diagonal.diag("0")[keep] < 1 / GAMMA).all()


@pytest.mark.parametrize(
    "cls,config", [(BlockFisherProvider, BlockFisherConfig), (DiagonalFisherProvider, DiagonalFisherConfig)]
)
def test_state_dict_round_trip(cls, config):
    model, batches, layers = problem()
    settings = {"damping": GAMMA, "num_grads": NUM_GRADS, "fisher_labels": "sampled"}
    first = cls(layers, config(**settings))
    first.ready(model, batches)
    state = first.state_dict()
    second = cls(layers, config(**settings))
    second.load_state_dict(state)
    assert second.examples == NUM_GRADS
    for name in layers:
        v = torch.randn(layers[name].shape)
        assert torch.equal(second.matvec(name, v), first.matvec(name, v))
    first.ready(model, batches), second.ready(model, batches)  # same label draws: the generator state was restored
    assert all(torch.equal(first.diag(n), second.diag(n)) for n in layers)
    with pytest.raises(CurvatureError, match="has shape"):
        second.load_state_dict({"tensors": {**state["tensors"], "0": torch.zeros(1)}})


def test_memory_budget_and_settings_are_checked():
    _, _, layers = problem()
    with pytest.raises(CurvatureError, match="curvature.block_size.*pruning.targets"):
        block_provider(layers, max_memory_gib=1e-9)
    assert block_provider(layers, max_memory_gib=1.0).estimated_bytes() == (10 + 6) * B * B * 4
    with pytest.raises(CurvatureError, match="curvature.num_grads"):
        BlockFisherConfig(num_grads=0)
    with pytest.raises(CurvatureError, match="curvature.block_size"):
        BlockFisherConfig(block_size=0)
    with pytest.raises(CurvatureError, match="allowed: empirical, sampled"):
        DiagonalFisherConfig(fisher_labels="true")


@pytest.mark.parametrize("cls", [BlockFisherProvider, DiagonalFisherProvider])
def test_empty_dataloader_is_refused_and_state_kept(cls):
    model, batches, layers = problem()
    provider = cls(
        layers,
        cls.config_class(
            damping=GAMMA, num_grads=NUM_GRADS, **({"block_size": B} if cls is BlockFisherProvider else {})
        ),
    )
    provider.ready(model, batches)
    before = provider.diag("0")
    with pytest.raises(CurvatureError, match="empty calibration dataloader"):
        provider.ready(model, [])
    assert torch.equal(provider.diag("0"), before)


def test_block_fisher_on_tiny_bert_with_sampled_labels():
    model = tiny_bert()
    layers = resolve_targets(model, ["re:.*layer\\.0\\..*(query|dense)$"])
    provider = BlockFisherProvider(
        layers, BlockFisherConfig(damping=1e-6, num_grads=6, fisher_labels="sampled", block_size=8)
    )
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in token_batches(n_batches=2)]
    assert provider.ready(model, batches) == {"examples": 6.0}
    for name in layers:
        d = provider.diag(name)
        assert torch.isfinite(d).all() and (d > 0).all() and (d < 1e6).any()

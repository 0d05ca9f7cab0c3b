"""fls_hf.curvature.fishleg.structures and the FishLeg provider's queries against an explicitly formed Q."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fls_hf.curvature.fishleg import FishLegConfig, FishLegProvider
from fls_hf.curvature.fishleg.structures import BlockDiagonalQ, DiagonalQ, KroneckerQ
from fls_hf.model.adapters import adapter_for

STRUCTURE_CASES = [
    ("kronecker", lambda: KroneckerQ(4, 6, 0.1)),
    ("kronecker-blocked", lambda: KroneckerQ(5, 7, 0.1, factor_block_size=3)),
    ("block_diagonal", lambda: BlockDiagonalQ(3, 7, 0.1, block_size=3)),
    ("diagonal", lambda: DiagonalQ(3, 5, 0.1)),
]


def randomise(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def explicit(matvec, shape) -> torch.Tensor:
    rows, cols = shape
    eye = torch.eye(rows * cols)
    return torch.stack([matvec(eye[k].view(rows, cols)).reshape(-1) for k in range(rows * cols)], dim=1)


@pytest.mark.parametrize("case", STRUCTURE_CASES, ids=[c[0] for c in STRUCTURE_CASES])
def test_structure_diag_column_symmetry_pd(case):
    structure = case[1]()
    randomise(structure)
    with torch.no_grad():
        q = explicit(structure.matvec, structure.shape)
        torch.testing.assert_close(structure.diag().reshape(-1), torch.diagonal(q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, q.T, rtol=1e-5, atol=1e-5)
    assert torch.linalg.eigvalsh(q.double()).min() > 0


def test_kronecker_matches_closed_form():
    """Q = D_A (RᵀR ⊗ LLᵀ) D_A in row-major vec form."""
    s = KroneckerQ(3, 4, 0.5)
    randomise(s, seed=1)
    with torch.no_grad():
        r, l_ = s.R.weight[0], s.L.weight[0]
        d_a = torch.diag(s.log_a.exp().reshape(-1))
        closed = d_a @ torch.kron((r.T @ r).contiguous(), (l_ @ l_.T).contiguous()) @ d_a
        torch.testing.assert_close(explicit(s.matvec, s.shape), closed, rtol=1e-5, atol=1e-5)


def test_init_diagonal_sets_exact_diagonal():
    d = torch.rand(3, 7) + 0.5
    for s in (KroneckerQ(3, 7, 0.1), BlockDiagonalQ(3, 7, 0.1, block_size=4), DiagonalQ(3, 7, 0.1)):
        randomise(s)
        s.init_diagonal(d)
        with torch.no_grad():
            torch.testing.assert_close(explicit(s.matvec, s.shape), torch.diag(d.reshape(-1)), rtol=1e-5, atol=1e-6)


LAYERS = {
    "linear-bias": lambda: nn.Linear(5, 3),
    "linear-nobias": lambda: nn.Linear(5, 3, bias=False),
    "conv1d": lambda: Conv1D(3, 5),  # GPT-2: nf=3 outputs, nx=5 inputs, weight stored (5, 3)
    "conv2d": lambda: nn.Conv2d(2, 3, kernel_size=2),
}


@pytest.mark.parametrize("structure", ["kronecker", "block_diagonal", "diagonal"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_provider_queries_against_explicit_q(structure, layer):
    torch.manual_seed(0)
    module = LAYERS[layer]()
    adapter = adapter_for("layer", module)
    provider = FishLegProvider({"layer": adapter}, FishLegConfig(damping=0.1, structure=structure, block_size=3))
    randomise(provider.structures["layer"])
    shape = adapter.shape
    q = explicit(lambda v: provider.matvec("layer", v), shape)
    torch.testing.assert_close(q, q.T, rtol=1e-5, atol=1e-5)
    assert torch.linalg.eigvalsh(q.double()).min() > 0
    torch.testing.assert_close(provider.diag("layer").reshape(-1), torch.diagonal(q), rtol=1e-5, atol=1e-5)
    # within-row blocks of 3 consecutive weights, read off the explicit matrix
    blocks = provider.blocks("layer", 3)
    rows, cols = shape
    for i in range(rows):
        for b, start in enumerate(range(0, cols, 3)):
            idx = [i * cols + j for j in range(start, min(start + 3, cols))]
            expected = q[idx][:, idx]
            got = blocks[i * -(-cols // 3) + b][: len(idx), : len(idx)]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adapter_matrix_views_round_trip():
    for make in LAYERS.values():
        module = make()
        adapter = adapter_for("m", module)
        m = adapter.weight_matrix()
        assert m.shape == adapter.shape
        torch.testing.assert_close(adapter.from_matrix(m), module.weight.detach())
    conv1d = Conv1D(3, 5)
    assert adapter_for("c", conv1d).shape == (3, 5)  # rows = outputs, cols = inputs


@pytest.mark.parametrize("factor_block_size", [None, 2], ids=["full", "blocked"])
def test_kronecker_row_model_is_the_within_row_blocks_of_q_inverse(factor_block_size):
    """Row i of the OBC model is [Q⁻¹]_(i, :cols),(i, :cols) = S_i⁻¹ [(RᵀR)⁻¹]_ii (LLᵀ)⁻¹ S_i⁻¹ (bias dropped)."""
    rows, width, cols = 5, 4, 3  # the last column is a bias's
    structure = KroneckerQ(rows, width, 0.1, factor_block_size=factor_block_size)
    randomise(structure, seed=3)
    with torch.no_grad():
        q_inverse = torch.linalg.inv(explicit(structure.matvec, structure.shape).double())
    model = structure.row_model(cols)
    assert model.damping == 0.0 and model.column_scale.shape == (rows, cols)
    a_bar = model.a_bar()
    for i in range(rows):
        block = q_inverse[i * width : i * width + cols, i * width : i * width + cols]
        scale = torch.diag(1 / model.column_scale[i])
        torch.testing.assert_close(scale @ (model.row_weight[i] * a_bar) @ scale, block, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(model.inverse_diag()[i], torch.linalg.inv(block).diagonal(), rtol=1e-6, atol=1e-8)

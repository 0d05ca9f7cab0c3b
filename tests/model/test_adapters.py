"""fls_hf.model.adapters: the (rows × cols) matrix view of each supported module kind, and the refusal of others."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from fls_hf.errors import UnsupportedModuleError
from fls_hf.model.adapters import SUPPORTED_TYPES, Conv1DAdapter, LayerAdapter, adapter_for, require_adapter


def seeded(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


class ScaledLinear(nn.Linear):
    """A subclass keeps the Linear adapter."""


CASES = {
    "linear": (lambda: seeded(nn.Linear(5, 3)), LayerAdapter, (3, 5)),
    "linear_subclass": (lambda: seeded(ScaledLinear(4, 2, bias=False)), LayerAdapter, (2, 4)),
    "conv1d": (lambda: seeded(Conv1D(3, 5)), Conv1DAdapter, (3, 5)),  # Conv1D(nf=out, nx=in): weight (in, out)
    "conv2d": (lambda: seeded(nn.Conv2d(2, 3, kernel_size=(2, 3))), LayerAdapter, (3, 12)),  # (out, in · kh · kw)
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_matrix_view_shape_and_round_trip(kind):
    build, adapter_class, shape = CASES[kind]
    module = build()
    adapter = adapter_for("layer", module)
    assert type(adapter) is adapter_class and adapter.name == "layer" and adapter.module is module
    assert adapter.shape == shape
    matrix = adapter.weight_matrix()
    assert matrix.shape == shape
    assert adapter.to_matrix(module.weight).data_ptr() == module.weight.data_ptr()  # a view, not a copy
    assert torch.equal(adapter.from_matrix(adapter.to_matrix(module.weight)), module.weight)
    other = torch.randn(shape)
    assert torch.equal(adapter.to_matrix(adapter.from_matrix(other)), other)
    assert adapter.from_matrix(other).shape == module.weight.shape
    assert adapter.bias is module.bias


def test_linear_matrix_is_its_weight_and_computes_the_layer():
    module = CASES["linear"][0]()
    matrix = adapter_for("fc", module).weight_matrix()
    assert torch.equal(matrix, module.weight)
    x = torch.randn(4, 5)
    torch.testing.assert_close(x @ matrix.T + module.bias, module(x))


def test_conv1d_matrix_is_the_transpose_and_computes_the_layer():
    module = CASES["conv1d"][0]()
    assert module.weight.shape == (5, 3)
    matrix = adapter_for("c_attn", module).weight_matrix()
    assert torch.equal(matrix, module.weight.T)
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(x @ matrix.T + module.bias, module(x))


def test_conv2d_matrix_flattens_in_channels_then_kernel():
    module = CASES["conv2d"][0]()
    matrix = adapter_for("conv", module).weight_matrix()
    for o in range(3):
        for c in range(2):
            for i in range(2):
                for j in range(3):
                    assert matrix[o, c * 6 + i * 3 + j] == module.weight[o, c, i, j]
    x = torch.randn(1, 2, 2, 3)  # one output position: the whole input is the patch
    torch.testing.assert_close(
        x.reshape(1, -1) @ matrix.T + module.bias, F.conv2d(x, module.weight, module.bias).reshape(1, 3)
    )


@pytest.mark.parametrize(
    "module, qualified",
    [
        (nn.Embedding(10, 4), "torch.nn.modules.sparse.Embedding"),
        (nn.Conv1d(2, 3, 3), "torch.nn.modules.conv.Conv1d"),  # torch's Conv1d is not transformers' Conv1D
        (nn.LayerNorm(4), "torch.nn.modules.normalization.LayerNorm"),
    ],
    ids=["embedding", "torch_conv1d", "layernorm"],
)
def test_unsupported_module_is_refused_by_name_with_the_supported_types(module, qualified):
    assert adapter_for("encoder.emb", module) is None
    with pytest.raises(UnsupportedModuleError, match=f"module `encoder.emb` of type {qualified} is targeted") as error:
        require_adapter("encoder.emb", module)
    message = str(error.value)
    assert "supported types: torch.nn.Linear, torch.nn.Conv2d, transformers.pytorch_utils.Conv1D" in message
    assert all(name in message for name in SUPPORTED_TYPES)
    assert "`pruning.targets`" in message and "`pruning.ignore`" in message
    assert isinstance(error.value, TypeError)


def test_require_adapter_returns_the_adapter_of_a_supported_module():
    module = nn.Linear(3, 2)
    adapter = require_adapter("fc", module)
    assert isinstance(adapter, LayerAdapter) and adapter.shape == (2, 3)

"""fls_hf.model.patches: a plain Conv2d is `conv_patches @ Wᵀ + b` per row; `conv_obstacle` names what breaks it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fls_hf.model.patches import conv_obstacle, conv_output_rows, conv_patches, plain_conv

CONVS = {
    "stride": dict(in_channels=2, out_channels=3, kernel_size=3, stride=2),
    "stride_2x1": dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1)),
    "dilation": dict(in_channels=2, out_channels=3, kernel_size=3, dilation=2),
    "padding_int": dict(in_channels=2, out_channels=3, kernel_size=3, padding=1),
    "padding_tuple_stride": dict(in_channels=2, out_channels=3, kernel_size=(3, 5), padding=(1, 2), stride=2),
    "same_odd_dilated": dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", dilation=2),
    "same_even": dict(
        in_channels=2, out_channels=3, kernel_size=(2, 4), padding="same"
    ),  # asymmetric: 1 extra at the end
    "same_even_dilated": dict(in_channels=2, out_channels=3, kernel_size=2, padding="same", dilation=3),
    "valid": dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding="valid"),
    "no_bias": dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, bias=False),
}


@pytest.mark.parametrize("kind", sorted(CONVS))
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")  # torch's own note
def test_patches_times_weight_matrix_are_the_conv2d_output_rows(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[kind])
    x = torch.randn(2, 2, 7, 9)
    out = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    patches = conv_patches(conv, x)
    positions = out.shape[2] * out.shape[3]
    assert patches.shape == (2, positions, 2 * conv.kernel_size[0] * conv.kernel_size[1])
    rows = patches @ conv.weight.reshape(3, -1).T + (0 if conv.bias is None else conv.bias)
    expected = conv_output_rows(out)
    assert expected.shape == (2, positions, 3)
    torch.testing.assert_close(rows, expected)
    if conv.padding == "same":
        assert out.shape[2:] == x.shape[2:]


def test_output_rows_are_positions_in_row_major_order():
    grad = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    rows = conv_output_rows(grad)
    assert rows.dtype == torch.float32 and rows.shape == (2, 4, 3)
    for n in range(2):
        for h in range(2):
            for w in range(2):
                assert torch.equal(rows[n, h * 2 + w], grad[n, :, h, w].float())


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: a different map of the weight."""

    def forward(self, x):
        w = (self.weight - self.weight.mean()) / self.weight.std()
        return self._conv_forward(x, w, self.bias)


class TFPaddedConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(F.pad(x, (0, 1, 0, 1)), weight, bias)


class RenamedConv(nn.Conv2d):
    """A subclass that keeps the forward stays plain."""


@pytest.mark.parametrize(
    "module, reason",
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2 (only groups=1)"),
        (nn.Conv2d(4, 4, 3, groups=4), "groups=4 (only groups=1)"),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect' (only 'zeros')"),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), "padding_mode='circular' (only 'zeros')"),
        (StandardisedConv(2, 3, 3), "StandardisedConv overrides the Conv2d forward"),
        (TFPaddedConv(2, 3, 3), "TFPaddedConv overrides the Conv2d forward"),
        (nn.Linear(2, 3), "Linear is not a Conv2d"),
        (nn.Conv2d(2, 3, 3), None),
        (RenamedConv(2, 3, 3, stride=2, padding="valid"), None),
    ],
    ids=["groups2", "depthwise", "reflect", "circular", "forward", "conv_forward", "linear", "plain", "plain_subclass"],
)
def test_conv_obstacle_names_the_reason(module, reason):
    assert conv_obstacle(module) == reason
    assert plain_conv(module) == (reason is None)


def test_a_reflect_padded_conv_is_indeed_not_the_patch_product():
    """Why the obstacle matters: the zero-padded patches give a different map at the border."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect", bias=False)
    x = torch.randn(1, 1, 5, 5)
    rows = conv_patches(conv, x) @ conv.weight.reshape(1, -1).T
    assert not torch.allclose(rows, conv_output_rows(conv(x)))

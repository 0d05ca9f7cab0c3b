"""im2col for `nn.Conv2d`: a convolution as a linear map applied at every output position.

With the weight in its matrix view W (out, in · kh · kw) (`adapters.py`), a plain convolution is

    out_{n,:,t} = W a_{n,t} + b,     a_{n,t} = the input patch under output position t, flattened,

so each output position plays the role of a token: the per-example gradient is g_n = Σ_t δ_{n,t}ᵀ a_{n,t}
and K-FAC averages a aᵀ over (examples × positions) (Grosse & Martens 2016, "KFC"). `conv_patches` gives
a_{n,t} (`F.unfold`: columns in the order of `weight.reshape(out, -1)`), `conv_output_rows` the matching
δ_{n,t}. Only "plain" convolutions are that map exactly (`conv_obstacle`); others keep the slow paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_obstacle(module: nn.Module) -> str | None:
    """Why `module` is not a plain Conv2d (None when it is): grouped convs mix only part of the input
    per output row, other padding modes pad with input values, and a subclass's own forward (weight
    standardisation, TF-style padding) is a different map of the weight."""
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a Conv2d"
    kind = type(module)
    if kind.forward is not nn.Conv2d.forward or kind._conv_forward is not nn.Conv2d._conv_forward:
        return f"{kind.__name__} overrides the Conv2d forward"
    if module.groups != 1:
        return f"groups={module.groups} (only groups=1)"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros')"
    return None


def plain_conv(module: nn.Module) -> bool:
    """True for a Conv2d that is exactly `conv_output_rows = conv_patches @ Wᵀ + b` (see `conv_obstacle`)."""
    return conv_obstacle(module) is None


def _padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding, as `F.pad` takes it; 'same' pads the extra one at the end (as torch)."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        (kh, kw), (dh, dw) = module.kernel_size, module.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def conv_patches(module: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) layer input → patches (N, L, C · kh · kw), L = H' · W' output positions, fp32."""
    left, right, top, bottom = _padding(module)
    x = inputs.float()
    padding: tuple[int, int] = (top, left)
    if left != right or top != bottom:  # asymmetric 'same': unfold only pads symmetrically
        x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2)


def conv_output_rows(grad: torch.Tensor) -> torch.Tensor:
    """(N, out, H', W') output (gradient) → (N, L, out), positions in `conv_patches`' order, fp32."""
    return grad.float().flatten(2).transpose(1, 2)

"""Structures of a transformer that can be removed whole: FFN neurons (issue 20). No maths here.

An FFN block maps x → down(act(up(x)) [⊙ gate(x)]): neuron j is row j of every producer (up, gate) and column j
of the consumer (down). A neuron whose consumer column is zero adds nothing to the block's output, whatever its
producers hold, so removing it from all three layers is exact; `shrink_ffn` does that and rewrites
`config.intermediate_size`, so the model loads with plain `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RecipeError
from .adapters import LayerAdapter
from .targets import resolve_targets

# (producers, consumer) child names of an FFN block, per family; the parent module is the block
FFN_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("intermediate.dense",), "output.dense"),  # BERT family (BertLayer, RobertaLayer, …)
    (("gate_proj", "up_proj"), "down_proj"),  # Llama family (LlamaMLP, MistralMLP, Qwen2MLP, …)
)


@dataclass(frozen=True)
class FFNBlock:
    """Module names of one FFN block: `producers` make the neurons (output rows), `consumer` reads them (columns)."""

    prefix: str
    producers: tuple[str, ...]
    consumer: str

    @property
    def modules(self) -> tuple[str, ...]:
        return (*self.producers, self.consumer)


def ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """Every FFN block of `model` in module order (BERT and Llama families); each block's Linear layers agree on the
    number of neurons."""
    modules = dict(model.named_modules())
    blocks = []
    for prefix in modules:
        for producers, consumer in FFN_LAYOUTS:
            names = [f"{prefix}.{child}" if prefix else child for child in (*producers, consumer)]
            if not all(isinstance(modules.get(n), nn.Linear) for n in names):
                continue
            width = modules[names[-1]].in_features
            if any(modules[n].out_features != width for n in names[:-1]):
                continue
            blocks.append(FFNBlock(prefix, tuple(names[:-1]), names[-1]))
    return blocks


def structure_blocks(model: nn.Module, structure: str | None) -> list[FFNBlock]:
    """The FFN blocks whose neurons `pruning.mask_type: neurons` removes; [] for weight masks (`structure` None)."""
    if structure is None:
        return []
    blocks = ffn_blocks(model)
    if not blocks:
        raise RecipeError(
            f"recipe key `pruning.mask_type` = {structure!r}: {type(model).__name__} has no FFN block fls_hf knows "
            "(BERT family: intermediate.dense → output.dense; Llama family: gate_proj / up_proj → down_proj)"
        )
    return blocks


def pruned_layers(model: nn.Module, pruning) -> dict[str, LayerAdapter]:
    """The layers a recipe's `pruning` section prunes: its targets, or every layer of the structures it removes."""
    blocks = structure_blocks(model, pruning.structure)
    if blocks:
        return resolve_targets(model, [m for b in blocks for m in b.modules], [])
    return resolve_targets(model, pruning.targets, pruning.ignore)


def live_neurons(model: nn.Module, block: FFNBlock) -> torch.Tensor:
    """bool (neurons,): True where the consumer's column holds a non-zero weight."""
    return dict(model.named_modules())[block.consumer].weight.detach().ne(0).any(dim=0)


def _kept(model: nn.Module) -> tuple[list[FFNBlock], dict[str, torch.Tensor], dict[str, int], int]:
    """Blocks, the neurons each keeps (its live ones, then the first dead ones as zero padding up to the common width,
    in their original order), its live count, and the common width (the largest live count)."""
    blocks = ffn_blocks(model)
    if not blocks:
        raise RecipeError(f"{type(model).__name__} has no FFN block fls_hf can shrink (BERT or Llama families)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "intermediate_size"):
        raise RecipeError(f"{type(model).__name__} has no `config.intermediate_size` to shrink")
    live = {b.prefix: live_neurons(model, b) for b in blocks}
    width = max(max(int(mask.sum()) for mask in live.values()), 1)
    kept = {}
    for prefix, mask in live.items():
        padding = torch.nonzero(~mask).flatten()[: width - int(mask.sum())]
        kept[prefix] = torch.sort(torch.cat([torch.nonzero(mask).flatten(), padding])).values
    return blocks, kept, {p: int(m.sum()) for p, m in live.items()}, width


@torch.no_grad()
def shrink_ffn(model: nn.Module) -> dict[str, int]:
    """Remove every FFN neuron whose consumer column is zero, in place, keeping one width for all blocks (the
    largest live count; narrower blocks keep some dead neurons as zero padding) and setting
    `config.intermediate_size` to it. Exact: the outputs do not change.

    Returns:
        block prefix → live neurons, and "intermediate_size" → the new width.
    """
    blocks, kept, live, width = _kept(model)
    modules = dict(model.named_modules())
    for block in blocks:
        index = kept[block.prefix]
        for name in block.producers:
            _replace(model, name, _rows_of(modules[name], index))
        _replace(model, block.consumer, _columns_of(modules[block.consumer], index))
    model.config.intermediate_size = width
    return {**live, "intermediate_size": width}


@torch.no_grad()
def shrunk_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The state dict `shrink_ffn` would leave, without touching `model` (only the FFN tensors are new; a training
    run keeps its parameters and optimizer state). Returns (state dict, `shrink_ffn`'s report)."""
    blocks, kept, live, width = _kept(model)
    state = dict(model.state_dict())
    for block in blocks:
        index = kept[block.prefix]
        for name in block.producers:
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in state:
                    state[key] = state[key][index.to(state[key].device)].clone()
        key = f"{block.consumer}.weight"
        state[key] = state[key][:, index.to(state[key].device)].clone()
    return state, {**live, "intermediate_size": width}


def save_shrunk(model: nn.Module, directory: str, **save_kwargs) -> dict[str, int]:
    """`save_pretrained` of the shrunk model (`shrunk_state_dict`, `config.intermediate_size` set to the new width)
    without changing `model`; loads with plain `from_pretrained`. Returns the shrink report."""
    state, report = shrunk_state_dict(model)
    original = model.config.intermediate_size
    model.config.intermediate_size = report["intermediate_size"]
    try:
        model.save_pretrained(directory, state_dict=state, **save_kwargs)
    finally:
        model.config.intermediate_size = original
    return report


def _rows_of(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[index.to(linear.weight.device)])
    if linear.bias is not None:
        out.bias.copy_(linear.bias[index.to(linear.bias.device)])
    return out


def _columns_of(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    out = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
    out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[:, index.to(linear.weight.device)])
    if linear.bias is not None:
        out.bias.copy_(linear.bias)
    return out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

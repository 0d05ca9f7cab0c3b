"""What fls_hf sees of a user's model, no maths: one matrix view per prunable layer (`LayerAdapter`),
im2col patches of convolutions, row blocks, the forward pass used by curvature work (eval mode, logits
from whatever the model returns), the resolution of a recipe's `targets` / `ignore` patterns, and the structures
(FFN neurons, attention heads) that can be removed whole, with `shrink` / `save_shrunk`."""

from .adapters import SUPPORTED_TYPES, Conv1DAdapter, LayerAdapter, adapter_for, require_adapter
from .blocks import from_row_blocks, regroup_row_blocks, row_blocks
from .forward import (
    curvature_mode,
    logits_of,
    model_device,
    model_inputs,
    unwrap,
    valid_rows,
    with_decoder_inputs,
)
from .patches import conv_obstacle, conv_output_rows, conv_patches, plain_conv
from .structures import (
    StructureBlock,
    attention_blocks,
    ffn_blocks,
    live_groups,
    pruned_blocks,
    save_shrunk,
    shrink,
    shrunk_state_dict,
    structure_blocks,
)
from .targets import name_matches, peft_inner_name, plain_name, resolve_targets

__all__ = [
    "SUPPORTED_TYPES",
    "StructureBlock",
    "attention_blocks",
    "ffn_blocks",
    "live_groups",
    "pruned_blocks",
    "save_shrunk",
    "shrink",
    "shrunk_state_dict",
    "structure_blocks",
    "Conv1DAdapter",
    "LayerAdapter",
    "adapter_for",
    "conv_obstacle",
    "conv_output_rows",
    "conv_patches",
    "curvature_mode",
    "from_row_blocks",
    "logits_of",
    "model_device",
    "model_inputs",
    "name_matches",
    "peft_inner_name",
    "plain_conv",
    "plain_name",
    "regroup_row_blocks",
    "require_adapter",
    "resolve_targets",
    "row_blocks",
    "unwrap",
    "valid_rows",
    "with_decoder_inputs",
]

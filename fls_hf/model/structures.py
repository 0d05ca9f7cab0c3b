"""Structures of a transformer that can be removed whole: FFN neurons and attention heads (issue 20). No maths here.

A structure is a group of input columns of a consumer layer and the matching output rows of its producers:
- an FFN neuron j of x → down(act(up(x)) [⊙ gate(x)]) is column j of down and row j of up (and gate);
- an attention head group is the `head_dim` columns per query head of the output projection o, the matching rows of
  q and the rows of the key / value head they read (grouped-query attention: a KV head and its query heads go
  together; BERT, GPT-NeoX, GPT-2: one head; GPT-NeoX fuses q, k, v per head in query_key_value, GPT-2 stacks all
  q | all k | all v in c_attn).
The layers are `nn.Linear` or GPT-2's `Conv1D`, which stores its weight as (in, out): rows and columns here are
always those of the (out, in) matrix view (`adapters`).
Whatever its producers hold, a group whose consumer columns are zero adds nothing to the output, so removing it from
every layer of the block is exact. `shrink` does that and rewrites the config (`intermediate_size`; Llama's
`num_attention_heads` / `num_key_value_heads`, `head_dim` kept; GPT-2's `n_inner`), so the model loads with plain
`from_pretrained`. BERT's, GPT-NeoX's and GPT-2's attention derive the head size from hidden_size /
num_attention_heads, so their heads cannot shrink that way: they stay in the saved model as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..errors import RecipeError
from ..progress import warn_main
from .adapters import Conv1D, LayerAdapter, adapter_for
from .blocks import any_in_groups, group_rows
from .targets import named_by, peft_inner_name, plain_name, resolve_targets


class FfnLayout(NamedTuple):
    """Child names of an FFN block's layers (the parent module is the block) and its width's config entry."""

    producers: tuple[str, ...]  # up (and gate)
    consumer: str  # down
    # the first of them that the model's config has; "{stack}" is the block's stack, encoder or decoder (BART)
    width_keys: tuple[str, ...] = ("intermediate_size",)
    halves: int = 1  # 2: one producer stacks gate and up rows (chunked in two), so neuron j is its rows j and width + j


class AttentionLayout(NamedTuple):
    """Child names of an attention block's layers (the parent module is the block) and how its heads lie in them."""

    holder: str  # the attention module, which holds the head size (`HEAD_SIZE_NAMES`)
    producers: tuple[str, ...]  # (q, k, v), or (fused qkv,)
    consumer: str  # o
    shrinkable: bool = False  # plain transformers loads it with fewer heads (the head size does not follow hidden size)
    interleaved: bool = False  # a fused qkv holds head h's q, k, v rows together (GPT-NeoX); else all q | all k | all v
    # the layers must be GPT-2's Conv1D: GPT-BigCode's nn.Linear c_attn of the same names interleaves q, k, v per head
    # (or shares one KV head), so reading it as GPT-2's stacking would remove the wrong rows
    conv1d_only: bool = False


FFN_LAYOUTS = (
    FfnLayout(("intermediate.dense",), "output.dense"),  # BERT family (BertLayer, RobertaLayer, …)
    FfnLayout(("gate_proj", "up_proj"), "down_proj"),  # Llama family (LlamaMLP, MistralMLP, …)
    FfnLayout(("gate_up_proj",), "down_proj", halves=2),  # Phi-3 family (fused gate / up)
    # GPT-NeoX family (Pythia), Persimmon: intermediate_size; Falcon: ffn_hidden_size
    FfnLayout(("dense_h_to_4h",), "dense_4h_to_h", ("intermediate_size", "ffn_hidden_size")),
    # GPT-2 (Conv1D layers), GPT-BigCode: n_inner; GPT-Neo (unset: 4 × hidden), StarCoder2: intermediate_size
    FfnLayout(("c_fc",), "c_proj", ("n_inner", "intermediate_size")),
    FfnLayout(("fc_in",), "fc_out", ("n_inner",)),  # GPT-J, CodeGen
    FfnLayout(("lin1",), "lin2", ("hidden_dim",)),  # DistilBERT
    FfnLayout(("Wi",), "Wo", halves=2),  # ModernBERT (fused input / gate, chunked in two)
    # BART, Whisper, Marian, mBART, Pegasus: {encoder,decoder}_ffn_dim; OPT: ffn_dim; Phi-2, CLIP: intermediate_size
    FfnLayout(("fc1",), "fc2", ("intermediate_size", "ffn_dim", "{stack}_ffn_dim")),
    FfnLayout(("wi",), "wo", ("d_ff",)),  # T5, mT5 (DenseReluDense)
    FfnLayout(("wi_0", "wi_1"), "wo", ("d_ff",)),  # T5 v1.1, Flan-T5, mT5, UMT5 (gated)
)
ATTENTION_LAYOUTS = (
    # BERT family: its head size is hidden_size / num_attention_heads, so (as in most families) its heads stay as zeros
    AttentionLayout(
        "attention.self", tuple(f"attention.self.{x}" for x in ("query", "key", "value")), "attention.output.dense"
    ),
    # Llama family: q / k / v → o, head_dim in its config: shrinks
    AttentionLayout("self_attn", tuple(f"self_attn.{x}_proj" for x in "qkv"), "self_attn.o_proj", shrinkable=True),
    AttentionLayout("self_attn", ("self_attn.qkv_proj",), "self_attn.o_proj", shrinkable=True),  # Phi-3 (fused)
    AttentionLayout("attention", ("attention.query_key_value",), "attention.dense", interleaved=True),  # GPT-NeoX
    AttentionLayout("attn", ("attn.c_attn",), "attn.c_proj", conv1d_only=True),  # GPT-2: fused q | k | v
    AttentionLayout("attn", tuple(f"attn.{x}_proj" for x in "qkv"), "attn.out_proj"),  # GPT-J
    AttentionLayout("attention", tuple(f"attention.{x}_proj" for x in "qkv"), "attention.out_proj"),  # GPT-Neo
    AttentionLayout("attention", tuple(f"attention.{x}_lin" for x in "qkv"), "attention.out_lin"),  # DistilBERT
    AttentionLayout("attn", ("attn.Wqkv",), "attn.Wo"),  # ModernBERT (fused q | k | v)
    # BART, Whisper, Marian, OPT, CLIP (head size hidden / heads): self-attention, and the decoders' cross-attention
    AttentionLayout("self_attn", tuple(f"self_attn.{x}_proj" for x in "qkv"), "self_attn.out_proj"),
    AttentionLayout("encoder_attn", tuple(f"encoder_attn.{x}_proj" for x in "qkv"), "encoder_attn.out_proj"),
    # T5: the first layer's relative position bias (a column per head) is shared by every layer of the stack, so the
    # layers' kept heads would have to agree: its heads stay as zeros
    AttentionLayout("SelfAttention", tuple(f"SelfAttention.{x}" for x in "qkv"), "SelfAttention.o"),
    AttentionLayout("EncDecAttention", tuple(f"EncDecAttention.{x}" for x in "qkv"), "EncDecAttention.o"),
)
# the attention module's attribute holding the head size (Llama, GPT-2, GPT-J, GPT-Neo; BERT; GPT-NeoX; T5)
HEAD_SIZE_NAMES = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
STRUCTURE_KINDS = ("neurons", "heads")


@dataclass(frozen=True)
class StructureBlock:
    """Module names of one block and how its groups lie in them: group g is columns [g·columns, (g+1)·columns) of the
    consumer and, in each producer, rows [start + g·r, start + (g+1)·r) of each of its segments (start, r).

    Args:
        kind: neurons | heads.
        prefix: the block's module name.
        producers: modules whose output rows make the groups (up / gate; q / k / v).
        consumer: the module whose input columns read them (down; o).
        producer_segments: per producer, its (start row, rows per group) segments: one at row 0 for a plain layer,
            two for Phi-3's fused gate / up projection.
        columns: consumer columns per group.
        groups: how many groups the block has.
        heads_per_group: query heads per group (heads; 1 for neurons).
        shrinkable: whether plain transformers can load the block with fewer groups.
        width_key: the config entry holding a neuron block's width (`intermediate_size`; GPT-2, GPT-J: `n_inner`).
    """

    kind: str
    prefix: str
    producers: tuple[str, ...]
    consumer: str
    producer_segments: tuple[tuple[tuple[int, int], ...], ...]
    columns: int
    groups: int
    heads_per_group: int = 1
    shrinkable: bool = True
    width_key: str = "intermediate_size"

    @property
    def modules(self) -> tuple[str, ...]:
        return (*self.producers, self.consumer)

    @property
    def key(self) -> str:
        """ "<prefix>/<kind>": unique per block (BERT's FFN and attention blocks share their layer's prefix)."""
        return f"{self.prefix}/{self.kind}"

    def producer_rows(self, producer: int, groups: torch.Tensor) -> torch.Tensor:
        """Rows of producer number `producer` that the given groups hold, segment by segment (the order `shrink`
        keeps, so a fused layer's segments stay in place)."""
        return torch.cat([start + group_rows(groups, rows) for start, rows in self.producer_segments[producer]])

    def consumer_columns(self, groups: torch.Tensor) -> torch.Tensor:
        """Columns of the consumer that the given groups hold."""
        return group_rows(groups, self.columns)

    def config_sizes(self, groups: int) -> dict[str, int]:
        """The config entries of a model whose blocks of this kind keep `groups` groups."""
        if self.kind == "neurons":
            return {self.width_key: groups}
        return {"num_key_value_heads": groups, "num_attention_heads": groups * self.heads_per_group}


def _child(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def _output_dim(layer: nn.Module) -> int:
    """The weight dimension of the output features (matrix rows), as the layer's adapter reads it."""
    return adapter_for("", layer).output_dim


def _is_dense(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of an `nn.Linear` (weight (out, in)) or a `Conv1D` (weight (in, out)); whole-weight sizes
    under FSDP2 too (a DTensor's shape is global)."""
    shape = module.weight.shape
    return shape[1 - _output_dim(module)], shape[_output_dim(module)]


def _linears(modules: dict[str, nn.Module], names: list[str]) -> list[str] | None:
    """The names resolved through PEFT wrappers to the modules they stand for (LoRA: its `base_layer`, which fls_hf
    prunes while the adapters train); None unless every one is an `nn.Linear` or GPT-2's `Conv1D`."""
    resolved = []
    for name in names:
        module = modules.get(name)
        inner = peft_inner_name(module) if module is not None else None
        if inner is not None:
            name = f"{name}.{inner}"
            module = modules.get(name)
        if not _is_dense(module):
            return None
        resolved.append(name)
    return resolved


def ffn_blocks(model: nn.Module) -> list[StructureBlock]:
    """Every FFN block of `model` in module order (`FFN_LAYOUTS`); each block's layers agree on the number of
    neurons."""
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    blocks = []
    for prefix in modules:
        for layout in FFN_LAYOUTS:
            names = _linears(modules, [_child(prefix, child) for child in (*layout.producers, layout.consumer)])
            if names is None:
                continue
            width = _features(modules[names[-1]])[0]
            if any(_features(modules[n])[1] != layout.halves * width for n in names[:-1]):
                continue
            segments = tuple((h * width, 1) for h in range(layout.halves))
            blocks.append(
                StructureBlock(
                    "neurons",
                    prefix,
                    tuple(names[:-1]),
                    names[-1],
                    (segments,) * len(layout.producers),
                    1,
                    width,
                    width_key=_width_key(config, layout, prefix),
                )  # fmt: skip
            )
    return blocks


def _width_key(config, layout: FfnLayout, prefix: str) -> str:
    """The first of the layout's width entries that the config has, "{stack}" read as the block's stack (decoder
    when a module on its path is named so, else encoder)."""
    stack = "decoder" if "decoder" in prefix.split(".") else "encoder"
    keys = [key.format(stack=stack) for key in layout.width_keys]
    return next((key for key in keys if hasattr(config, key)), keys[0])


def attention_blocks(model: nn.Module) -> list[StructureBlock]:
    """Every attention block of `model` in module order (`ATTENTION_LAYOUTS`): its groups are KV heads with their
    query heads (one head each without grouped-query attention)."""
    modules = dict(model.named_modules())
    blocks = []
    for prefix in modules:
        for layout in ATTENTION_LAYOUTS:
            names = _linears(modules, [_child(prefix, child) for child in (*layout.producers, layout.consumer)])
            attention = modules.get(_child(prefix, layout.holder))
            if attention is None or names is None:
                continue
            if layout.conv1d_only and not all(_is_conv1d(modules[n]) for n in names):
                continue
            head_dim = next((getattr(attention, a) for a in HEAD_SIZE_NAMES if hasattr(attention, a)), None)
            per_group = getattr(attention, "num_key_value_groups", 1)
            *outputs, o_inputs = [_features(modules[n])[1] for n in names[:-1]] + [_features(modules[names[-1]])[0]]
            if len(outputs) == 3:
                q_rows, k_rows, v_rows = outputs
            elif layout.interleaved:  # one head's q, k and v rows after another's (no grouped-query attention)
                q_rows = k_rows = v_rows = outputs[0] // 3
            else:  # fused q | k | v rows (Phi-3's qkv_proj, GPT-2's c_attn): the query part is as wide as o's input
                q_rows, k_rows = o_inputs, (outputs[0] - o_inputs) // 2
                v_rows = outputs[0] - q_rows - k_rows
            if head_dim is None or k_rows % head_dim or k_rows != v_rows or _norm_spans_heads(attention, head_dim):
                continue
            groups = k_rows // head_dim
            if q_rows != groups * per_group * head_dim or o_inputs != q_rows:
                continue
            q, kv = (0, per_group * head_dim), (0, head_dim)
            if len(outputs) == 3:
                segments = ((q,), (kv,), (kv,))
            elif layout.interleaved:
                if per_group != 1 or outputs[0] != 3 * q_rows:
                    continue
                segments = (((0, 3 * head_dim),),)
            else:
                segments = ((q, (q_rows, head_dim), (q_rows + k_rows, head_dim)),)
            blocks.append(
                StructureBlock(
                    "heads",
                    prefix,
                    tuple(names[:-1]),
                    names[-1],
                    segments,
                    per_group * head_dim,
                    groups,
                    per_group,
                    layout.shrinkable,
                )  # fmt: skip
            )
    return blocks


def blocks_of(model: nn.Module, kind: str) -> list[StructureBlock]:
    """`ffn_blocks` for neurons, `attention_blocks` for heads."""
    return ffn_blocks(model) if kind == "neurons" else attention_blocks(model)


KNOWN_LAYOUTS = {
    "neurons": "BERT family: intermediate.dense → output.dense; Llama family: gate_proj / up_proj → down_proj; "
    "Phi-3: gate_up_proj → down_proj; GPT-NeoX, Falcon: dense_h_to_4h → dense_4h_to_h; GPT-2, GPT-Neo, GPT-BigCode, "
    "StarCoder2: mlp.c_fc → mlp.c_proj; GPT-J, CodeGen: mlp.fc_in → mlp.fc_out; DistilBERT: ffn.lin1 → ffn.lin2; "
    "ModernBERT: mlp.Wi → mlp.Wo; BART, Whisper, OPT, Phi-2, CLIP: fc1 → fc2; T5: DenseReluDense.wi (or wi_0 / wi_1) "
    "→ wo",
    "heads": "BERT family: attention.self.query / key / value → attention.output.dense; Llama family: "
    "self_attn.q_proj / k_proj / v_proj → o_proj, q / k norms per head if any (OLMo-2 normalises across heads); "
    "Phi-3: self_attn.qkv_proj → o_proj; GPT-NeoX: attention.query_key_value (interleaved per head) → "
    "attention.dense; GPT-2: attn.c_attn → attn.c_proj; GPT-J: attn.q_proj / k_proj / v_proj → attn.out_proj; "
    "GPT-Neo: attn.attention.q_proj / k_proj / v_proj → out_proj; DistilBERT: attention.q_lin / k_lin / v_lin → "
    "attention.out_lin; ModernBERT: attn.Wqkv → attn.Wo; BART, Whisper, OPT, CLIP: self_attn (or encoder_attn)"
    ".q_proj / k_proj / v_proj → out_proj; T5: SelfAttention (or EncDecAttention).q / k / v → o",
}


def _norm_spans_heads(attention: nn.Module, head_dim: int) -> bool:
    """Whether q or k is normalised across all heads (OLMo-2's q_norm / k_norm over the whole projection): removing a
    head would change every other head's output, so its heads are not groups. Per-head norms (Qwen3's) are fine."""
    norms = (getattr(attention, name, None) for name in ("q_norm", "k_norm"))
    return any(getattr(n, "weight", None) is not None and n.weight.numel() != head_dim for n in norms)


def structure_blocks(model: nn.Module, structure: str | None) -> list[StructureBlock]:
    """The blocks whose groups `pruning.mask_type` (neurons | heads | neurons+heads) removes, FFN blocks first; [] for
    weight masks (`structure` None)."""
    if structure is None:
        return []
    blocks = []
    for kind in structure.split("+"):
        found = blocks_of(model, kind)
        if not found:
            raise RecipeError(
                f"recipe key `pruning.mask_type` = {structure!r}: {type(model).__name__} has no {kind} block fls_hf "
                f"knows ({KNOWN_LAYOUTS[kind]})"
            )
        blocks += found
    return blocks


def pruned_blocks(model: nn.Module, pruning) -> list[StructureBlock]:
    """The blocks a neurons / heads recipe removes groups from: those with a layer named by `pruning.targets` (every
    block when empty) and none named by `pruning.ignore` (a group spans its block's layers, so ignoring one of them
    keeps the whole block); [] for weight masks.

    Raises:
        RecipeError: a target names no layer of any block, or the keys leave no block.
    """
    blocks = structure_blocks(model, pruning.structure)
    if not blocks:
        return []
    for pattern in pruning.targets:
        if not any(_named(b, [pattern]) for b in blocks):
            raise RecipeError(
                f"recipe key `pruning.targets` pattern {pattern!r} names no layer of a {pruning.structure} block of "
                f"{type(model).__name__}; its layers are named like {', '.join(map(plain_name, blocks[0].modules))}"
            )
    targeted = [b for b in blocks if _named(b, pruning.targets)] if pruning.targets else blocks
    chosen = [b for b in targeted if not _named(b, pruning.ignore)]
    if not chosen:
        raise RecipeError(
            f"recipe keys `pruning.targets` = {pruning.targets!r} / `pruning.ignore` = {pruning.ignore!r} leave no "
            f"{pruning.structure} block of {type(model).__name__} to prune"
        )
    return chosen


def _named(block: StructureBlock, patterns: list[str]) -> bool:
    """Whether a pattern names one of the block's layers, by its name or its name before PEFT wrapped the model."""
    return any(named_by(name, patterns) for name in block.modules)


def pruned_layers(model: nn.Module, pruning) -> dict[str, LayerAdapter]:
    """The layers a recipe's `pruning` section prunes: its targets, or every layer of the blocks it removes structures
    from (`pruned_blocks`)."""
    blocks = pruned_blocks(model, pruning)
    if blocks:
        return resolve_targets(model, [m for b in blocks for m in b.modules], [])
    return resolve_targets(model, pruning.targets, pruning.ignore)


def adapter_factors(model: nn.Module, block: StructureBlock) -> list[tuple[torch.Tensor, int, int]]:
    """The LoRA factors that carry the block's groups under PEFT, as (tensor, dim, producer number or -1 for the
    consumer): `lora_A` columns of the consumer and `lora_B` rows (and bias) of each producer. Zeroing a removed
    group's entries keeps the adapters' update s·B·A off its columns and rows, so the PEFT model trains as exactly
    the model that a merge gives and `shrink` cuts; [] for a block without adapters.

    Raises:
        RecipeError: a producer uses DoRA, which divides each output row by its norm (zero once the row is removed).
    """
    factors = []
    for name, dim, producer in [(block.consumer, 1, -1), *((p, 0, i) for i, p in enumerate(block.producers))]:
        wrapper_name, _, inner = name.rpartition(".")
        if inner != "base_layer":
            continue
        wrapper = model.get_submodule(wrapper_name)
        adapters = getattr(wrapper, "lora_A" if dim == 1 else "lora_B", None)
        if not isinstance(adapters, nn.ModuleDict):
            continue
        for key, layer in adapters.items():
            if dim == 0 and getattr(wrapper, "use_dora", {}).get(key):
                raise RecipeError(
                    f"`{plain_name(wrapper_name)}` uses DoRA, which divides each output row by its norm: removing "
                    f"{block.kind} zeroes rows of it (a division by zero); leave it out of the LoRA `target_modules` "
                    "or use plain LoRA"
                )
            factors += [(t, dim, producer) for t in (layer.weight, layer.bias if dim == 0 else None) if t is not None]
    return factors


def live_groups(model: nn.Module, block: StructureBlock) -> torch.Tensor:
    """bool (groups,): True where the group's consumer columns hold a non-zero weight (the groups it has now; FSDP2:
    in this rank's rows)."""
    return any_in_groups(
        adapter_for(block.consumer, model.get_submodule(block.consumer)).weight_matrix(), block.columns
    )


def shrinkable_blocks(model: nn.Module, kinds: str | tuple[str, ...] | None = None) -> list[StructureBlock]:
    """The blocks of `kinds` that plain transformers can load with fewer groups (not BERT's heads), whose config
    holds the entries `shrink` sets."""
    config = getattr(model, "config", None)
    blocks = [b for kind in _kinds(kinds) for b in blocks_of(model, kind)]
    return [b for b in blocks if b.shrinkable and all(hasattr(config, key) for key in b.config_sizes(1))]


def _kept(model: nn.Module, kinds: tuple[str, ...]) -> tuple[list[StructureBlock], dict[str, torch.Tensor], dict]:
    """The shrinkable blocks of `kinds`, the groups each keeps (its live ones, then the first dead ones as zero
    padding up to the common width of the blocks that set the same config entries, in their original order), and the
    report: live groups per block and the config entries of the new widths."""
    config = getattr(model, "config", None)
    if config is None:
        raise RecipeError(f"{type(model).__name__} has no `config` to shrink")
    blocks = shrinkable_blocks(model, kinds)
    if any(name.endswith(".base_layer") for b in blocks for name in b.modules):
        raise RecipeError(
            f"{type(model).__name__} wraps its layers in PEFT adapters: merge them first "
            "(`fls_hf.peft.masked_merge_and_unload(model, pruner)`), then shrink the merged model"
        )
    if not blocks:
        raise RecipeError(
            f"{type(model).__name__} has no block fls_hf can shrink ({', '.join(kinds)}; FFN: "
            f"{KNOWN_LAYOUTS['neurons']}; heads: the Llama family's, whose head size is in its config)"
        )
    live = {b.key: live_groups(model, b) for b in blocks}
    kept, report = {}, {}
    for kind in kinds:
        of_kind = [b for b in blocks if b.kind == kind]
        # blocks that set the same config entries share one width (BART's encoder and decoder FFNs have one each)
        by_entries: dict[tuple[str, ...], list[StructureBlock]] = {}
        for block in of_kind:
            by_entries.setdefault(tuple(block.config_sizes(1)), []).append(block)
        for same in by_entries.values():
            width = _loadable_width(config, same[0], max(max(int(live[b.key].sum()) for b in same), 1))
            for block in same:
                mask = live[block.key]
                padding = torch.nonzero(~mask).flatten()[: width - int(mask.sum())]
                kept[block.key] = torch.sort(torch.cat([torch.nonzero(mask).flatten(), padding])).values
                report[block.key] = int(mask.sum())
            report.update(same[0].config_sizes(width))
        if kind == "heads" and of_kind:  # Phi-3 derives head_dim from hidden_size / heads unless its config holds it
            report["head_dim"] = of_kind[0].columns // of_kind[0].heads_per_group
    return blocks, kept, report


def _loadable_width(config, block: StructureBlock, width: int) -> int:
    """The fewest groups, at least `width`, that the model's config class accepts: transformers 5's `LlamaConfig`
    wants `num_attention_heads` to divide `hidden_size` even with `head_dim` set (Llama-3-8B: 32 / 16 / 8 ... heads),
    so a count in between keeps some removed groups as zero padding and says so. A config class that refuses its
    own sizes cannot be probed: `width` then stands."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception:  # noqa: BLE001 — not a probe of the sizes: shrink as asked
        return width
    for groups in range(width, block.groups + 1):
        try:
            type(config).from_dict({**config.to_dict(), **block.config_sizes(groups)})
        except Exception:  # noqa: BLE001 — any validator of any family refusing the sizes; probe the next count
            continue
        if groups > width:
            warn_main(
                "fls_hf: %s refuses %d %s; the shrunk model keeps %d, %d of them removed ones as zeros",
                type(config).__name__,
                width * block.heads_per_group,
                block.kind,
                groups * block.heads_per_group,
                (groups - width) * block.heads_per_group,
            )
        return groups
    return block.groups


def _kinds(kinds: str | tuple[str, ...] | None) -> tuple[str, ...]:
    kinds = STRUCTURE_KINDS if kinds is None else (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in STRUCTURE_KINDS]
    if unknown:
        raise ValueError(f"unknown structure {unknown[0]!r}; expected {', '.join(STRUCTURE_KINDS)}")
    return kinds


@torch.no_grad()
def shrink(model: nn.Module, kinds: str | tuple[str, ...] | None = None) -> dict[str, int]:
    """Remove every group (FFN neuron, attention head group) whose consumer columns are zero, in place, keeping one
    width per config entry (the largest live count among the blocks it sizes — one per kind, but BART's encoder and
    decoder FFNs have an entry each; narrower blocks keep some dead groups as zero padding), and set the config to it.
    Exact: the outputs do not change. Blocks plain transformers cannot load shrunk (BERT's heads) are left as they are.

    Returns:
        "<block prefix>/<kind>" → live groups, and the config entries set.
    """
    blocks, kept, report = _kept(model, _kinds(kinds))
    for block in blocks:
        index = kept[block.key]
        for i, name in enumerate(block.producers):
            _replace(model, name, _rows_of(model.get_submodule(name), block.producer_rows(i, index)))
        consumer = model.get_submodule(block.consumer)
        _replace(model, block.consumer, _columns_of(consumer, block.consumer_columns(index)))
    for key, value in report.items():
        if "/" not in key:
            setattr(model.config, key, value)
    return report


def shrink_ffn(model: nn.Module) -> dict[str, int]:
    """`shrink` of the FFN neurons only."""
    return shrink(model, "neurons")


@torch.no_grad()
def shrunk_state_dict(
    model: nn.Module, kinds: str | tuple[str, ...] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The state dict `shrink` would leave, without touching `model` (only the shrunk tensors are new; a training
    run keeps its parameters and optimizer state). Returns (state dict, `shrink`'s report)."""
    blocks, kept, report = _kept(model, _kinds(kinds))
    state = dict(model.state_dict())
    for block in blocks:
        index = kept[block.key]
        for i, name in enumerate(block.producers):
            rows = block.producer_rows(i, index)
            for key, dim in ((f"{name}.weight", _output_dim(model.get_submodule(name))), (f"{name}.bias", 0)):
                if key in state:
                    state[key] = state[key].index_select(dim, rows.to(state[key].device)).clone()
        key = f"{block.consumer}.weight"
        columns = block.consumer_columns(index).to(state[key].device)
        state[key] = state[key].index_select(1 - _output_dim(model.get_submodule(block.consumer)), columns).clone()
    return state, report


def save_shrunk(model: nn.Module, directory: str, kinds: str | tuple[str, ...] | None = None) -> dict[str, int]:
    """`save_pretrained` of the shrunk model (`shrunk_state_dict`, the config set to the new widths) without
    changing `model`; loads with plain `from_pretrained`. Returns the shrink report."""
    state, report = shrunk_state_dict(model, kinds)
    sizes = {k: v for k, v in report.items() if "/" not in k}
    absent = object()  # an entry the config did not hold (Phi-3's head_dim) is removed again afterwards
    original = {k: getattr(model.config, k, absent) for k in sizes}
    for key, value in sizes.items():
        setattr(model.config, key, value)
    try:
        model.save_pretrained(directory, state_dict=state)
    finally:
        for key, value in original.items():
            if value is absent:
                delattr(model.config, key)
            else:
                setattr(model.config, key, value)
    return report


def _like(layer: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """A new layer of `layer`'s kind (Linear, or Conv1D: always with a bias), device and dtype, of the given sizes."""
    if _is_conv1d(layer):
        new = Conv1D(out_features, in_features)
    else:
        new = nn.Linear(in_features, out_features, bias=layer.bias is not None)
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


def _rows_of(layer: nn.Module, index: torch.Tensor) -> nn.Module:
    """`layer` keeping the output features (matrix rows) `index`."""
    out = _like(layer, _features(layer)[0], len(index))
    out.weight.copy_(layer.weight.index_select(_output_dim(layer), index.to(layer.weight.device)))
    if layer.bias is not None:
        out.bias.copy_(layer.bias[index.to(layer.bias.device)])
    return out


def _columns_of(layer: nn.Module, index: torch.Tensor) -> nn.Module:
    """`layer` keeping the input features (matrix columns) `index`."""
    out = _like(layer, len(index), _features(layer)[1])
    out.weight.copy_(layer.weight.index_select(1 - _output_dim(layer), index.to(layer.weight.device)))
    if layer.bias is not None:
        out.bias.copy_(layer.bias)
    return out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

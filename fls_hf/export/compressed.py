"""Compressed checkpoints: pruned weights stored as a bitmask plus their non-zero values.

A pruned model saved with `save_pretrained` stores its zeros densely. `save_compressed` writes
`sparse_weights.safetensors` instead (next to `config.json`): for each targeted layer's weight
W: shape S, dtype D,

- `bitmask/<key>`: uint8 (ceil(numel / 8),), bit i set where W.flatten()[i] != 0
  (`numpy.packbits` order, most significant bit first, as the pruner's saved masks),
- `values/<key>`: D (nnz,), the non-zero entries in row-major order,
- `negzero/<key>`: only when W holds −0.0 entries (multiplying by a 0/1 mask makes them; fls_hf's
  masks write +0.0), a second bitmask of where they are, so that the round trip is bit-exact,

and every other state-dict tensor dense as `dense/<key>`; shapes, dtypes, tied (shared) tensors and a
format version go into the safetensors metadata. At 90 % sparsity an fp32 weight takes 1/8 + 0.1 · 4
= 0.525 bytes per entry instead of 4 (7.6× smaller). Nothing is pickled.

This is fls_hf's own format: compressed-tensors (0.20) still has a `sparse-bitmask` config class, but
its sparse compressors were removed in 2026-03 (llm-compressor #2452), so nothing there writes or reads
such weights any more. `load_compressed` is the reader; the model needs neither fls_hf nor the
recipe to run once loaded.

Example:
    >>> save_compressed(model, "out-compressed", "recipes/gradual-unstructured-90.yaml")
    >>> model = load_compressed(AutoModelForSequenceClassification, "out-compressed")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig

from ..errors import FlsError, PruningStateError
from ..model.adapters import LayerAdapter
from ..model.forward import unwrap
from ..model.structures import pruned_layers
from ..pruning.masks import pack_bits, unpack_bits
from ..recipe import PruningRecipe, load_recipe

WEIGHTS_FILE = "sparse_weights.safetensors"
FORMAT = "fls_hf.sparse_bitmask"
FORMAT_VERSION = "1"

RecipeOrLayers = PruningRecipe | Mapping[str, Any] | str | os.PathLike | Sequence[str]


def _targeted_keys(model: nn.Module, recipe_or_layers: RecipeOrLayers) -> list[str]:
    """State-dict keys of the targeted weights: from a recipe, a `{name: LayerAdapter}` map or module names."""
    if (
        isinstance(recipe_or_layers, Mapping)
        and recipe_or_layers
        and all(isinstance(v, LayerAdapter) for v in recipe_or_layers.values())
    ):
        names = list(recipe_or_layers)
    elif isinstance(recipe_or_layers, Sequence) and not isinstance(recipe_or_layers, str):
        names = list(recipe_or_layers)
    else:
        recipe = recipe_or_layers if isinstance(recipe_or_layers, PruningRecipe) else load_recipe(recipe_or_layers)
        names = list(pruned_layers(model, recipe.pruning))
    return [f"{name}.weight" for name in names]


def _tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """key → first key sharing its storage, shape and strides (tied embeddings are stored once)."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, tensor in state.items():
        ident = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
        )
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def compress_state_dict(
    state: Mapping[str, torch.Tensor], sparse_keys: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the compressed file for a state dict; `sparse_keys` are stored as bitmask + values."""
    missing = sorted(set(sparse_keys) - set(state))
    if missing:
        raise FlsError(f"targeted weight(s) {missing[:5]} are not in the model's state dict")
    aliases, sparse_keys = _tied_aliases(state), set(sparse_keys)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        if key in aliases:
            continue
        tensor = tensor.detach().cpu().contiguous()
        if key in sparse_keys:
            nonzero, negzero = tensor != 0, (tensor == 0) & torch.signbit(tensor)
            tensors[f"bitmask/{key}"] = pack_bits(nonzero)
            tensors[f"values/{key}"] = tensor[nonzero]
            if negzero.any():
                tensors[f"negzero/{key}"] = pack_bits(negzero)
            shapes[key] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        else:
            tensors[f"dense/{key}"] = tensor
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sparse": json.dumps(shapes),
        "aliases": json.dumps(aliases),
    }
    return tensors, metadata


def save_compressed(model: nn.Module, output_dir: str | os.PathLike, recipe_or_layers: RecipeOrLayers) -> Path:
    """Write `sparse_weights.safetensors` (targeted weights as bitmask + values) and `config.json`.

    Args:
        model: the pruned model (DDP / compiled wrappers are unwrapped).
        output_dir: created if needed.
        recipe_or_layers: the recipe (`PruningRecipe`, path, YAML or dict) whose targets are compressed,
            `pruner.layers`, or a list of module names.

    Returns the path of the weights file. A PEFT model is saved with its adapters as they are (dense);
    merge them first (`fls_hf.peft.masked_merge_and_unload`) for a plain, loadable-by-class checkpoint.

    Raises:
        FlsError: `model` has no `config` (not a `transformers` model), or a targeted weight is missing.

    Example:
        >>> save_compressed(trainer.model, "out-compressed", trainer.recipe)
    """
    model = unwrap(model)
    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise FlsError(f"save_compressed needs a transformers model with a `config`; got {type(model).__name__}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tensors, metadata = compress_state_dict(model.state_dict(), _targeted_keys(model, recipe_or_layers))
    path = output_dir / WEIGHTS_FILE
    save_file(tensors, str(path), metadata=metadata)
    model.config.save_pretrained(output_dir)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise PruningStateError(
            f"no compressed checkpoint at {path}: expected {WEIGHTS_FILE} written by save_compressed"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise PruningStateError(f"compressed checkpoint {path} is unreadable or truncated: {exc}") from exc


def decompress_state_dict(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Inverse of `compress_state_dict`; every entry is checked against the metadata."""
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise PruningStateError(
            f"{source}: metadata format {metadata.get('format')!r} version {metadata.get('version')!r}; expected "
            f"{FORMAT!r} {FORMAT_VERSION!r}"
        )
    try:
        sparse, aliases = json.loads(metadata["sparse"]), json.loads(metadata["aliases"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise PruningStateError(f"{source}: metadata key `sparse` / `aliases` missing or not JSON") from exc
    state = {key[len("dense/") :]: tensor for key, tensor in tensors.items() if key.startswith("dense/")}
    for key, info in sparse.items():
        state[key] = _decompress(key, tensors.get(f"bitmask/{key}"), tensors.get(f"values/{key}"), info, source)
        if f"negzero/{key}" in tensors:
            state[key][_unpack(f"negzero/{key}", tensors[f"negzero/{key}"], tuple(info["shape"]), source)] = -0.0
    for key, target in aliases.items():
        if target not in state:
            raise PruningStateError(f"{source}: tied tensor `{key}` points to `{target}`, which is not stored")
        state[key] = state[target]
    return state


def _decompress(
    key: str, bitmask: torch.Tensor | None, values: torch.Tensor | None, info: Mapping[str, Any], source: str
) -> torch.Tensor:
    """Dense tensor of `info["shape"]` from its packed non-zero bitmask and values."""
    shape = tuple(info["shape"])
    if bitmask is None or values is None:
        raise PruningStateError(f"{source}: `bitmask/{key}` or `values/{key}` is missing")
    nonzero = _unpack(f"bitmask/{key}", bitmask, shape, source)
    if str(values.dtype).removeprefix("torch.") != info["dtype"] or values.shape != (int(nonzero.sum()),):
        raise PruningStateError(
            f"{source}: `values/{key}` holds {values.numel()} {values.dtype} values; the bitmask has "
            f"{int(nonzero.sum())} {info['dtype']}"
        )
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[nonzero] = values
    return dense


def _unpack(key: str, packed: torch.Tensor, shape: tuple[int, ...], source: str) -> torch.Tensor:
    needed = -(-int(torch.Size(shape).numel()) // 8)
    if packed.dtype != torch.uint8 or packed.shape != (needed,):
        raise PruningStateError(f"{source}: `{key}` must be uint8 of {needed} bytes for shape {list(shape)}")
    return unpack_bits(packed, shape)


def _build(model_class: type, directory: Path) -> nn.Module:
    """`model_class` from `directory/config.json`; a config that asks for custom code (`auto_map`) is refused."""
    try:
        custom = "auto_map" in json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PruningStateError(f"{directory / 'config.json'} is missing or not JSON: {exc}") from exc
    if custom:
        raise PruningStateError(
            f"{directory / 'config.json'} has an `auto_map` (custom modeling code); fls_hf never runs remote code: "
            "build the model yourself (with the trust you choose) and pass the instance to load_compressed"
        )
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    return model.eval()


def load_compressed(model_or_class: nn.Module | type, directory: str | os.PathLike) -> nn.Module:
    """Load a checkpoint written by `save_compressed`; returns the model with the exact saved weights.

    Args:
        model_or_class: a model to load into, or a class built from `directory/config.json`
            (an `AutoModelFor...` class or a `PreTrainedModel` subclass), put in eval mode.
        directory: the folder `save_compressed` wrote.

    Raises:
        PruningStateError: the file is missing, truncated or corrupt, or does not match the model; or
            `config.json` asks for custom code (`auto_map`) when a class is given (remote code never runs).

    Example:
        >>> model = load_compressed(AutoModelForSequenceClassification, "out-compressed")
    """
    directory = Path(directory)
    tensors, metadata = _read(directory / WEIGHTS_FILE)
    state = decompress_state_dict(tensors, metadata, source=str(directory / WEIGHTS_FILE))
    model = _build(model_or_class, directory) if isinstance(model_or_class, type) else model_or_class
    try:
        result = unwrap(model).load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise PruningStateError(
            f"{directory / WEIGHTS_FILE} does not match {type(unwrap(model)).__name__}: {exc}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise PruningStateError(
            f"{directory / WEIGHTS_FILE} does not match {type(unwrap(model)).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


__all__ = ["WEIGHTS_FILE", "compress_state_dict", "decompress_state_dict", "load_compressed", "save_compressed"]

"""Dense models trained once and kept in benchmarks/cache/ (safetensors + meta.json; never pickle).

A cached model is reused only when the settings it was trained with equal the requested ones; quick
(smoke) runs pass `cache=False`, so they neither read nor write the cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"


def trained(
    model: nn.Module,
    folder: Path,
    settings: dict,
    train: Callable[[nn.Module], None],
    *,
    cache: bool = True,
    evaluate: Callable[[nn.Module], dict] | None = None,
) -> tuple[nn.Module, dict]:
    """`model` (in eval mode) with the cached weights, or trained by `train` now (timed) and cached.

    meta = {"settings", "train_seconds", **evaluate(model)}: the evaluation is not part of the timing."""
    meta_file = folder / "meta.json"
    if cache and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta["settings"] == settings:
            model.load_state_dict(load_file(str(folder / WEIGHTS)))
            return model.eval(), meta
    start = time.time()
    train(model)
    meta = {"settings": settings, "train_seconds": time.time() - start}
    meta.update(evaluate(model) if evaluate else {})
    if cache:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
        meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    return model.eval(), meta

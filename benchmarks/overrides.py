"""`--set key=value` overrides of a recipe's `curvature:` section, shared by the gradual benchmarks.

`key=value` applies to every selected method, `method.key=value` (e.g. `fls.init=diagonal`) to one.

Rows measured with overrides carry them in their name (`fls[damping=0.0001]`), so scan points sit
beside the defaults in one results file.
"""

from __future__ import annotations

import json


def parse_overrides(pairs: list[str], method: str) -> dict:
    """Overrides for `method`: `["damping=1e-4", "fls.init=diagonal"]` → {"damping": 0.0001, "init": "diagonal"}
    for fls (values parsed as JSON, else kept as text)."""
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        scope, dot, name = key.rpartition(".")
        if not sep or not name:
            raise SystemExit(f"--set expects key=value or method.key=value, got {pair!r}")
        if dot and scope != method:
            continue
        key = name
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def row_name(method: str, overrides: dict) -> str:
    return method + ("[" + ",".join(f"{k}={v}" for k, v in overrides.items()) + "]" if overrides else "")

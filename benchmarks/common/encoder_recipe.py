"""The MiniLM benchmarks' recipe shape, kept free of torch so a parent process that only spawns children stays
light (importing torch and transformers costs seconds per process)."""

from __future__ import annotations

ENCODER_TARGETS = [r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)$"]


def recipe(method: str, curvature: dict, **pruning) -> dict:
    """A recipe dict pruning the encoder linears with one global threshold (each layer at most 98 %)."""
    return {
        "pruning": {
            "method": method,
            "targets": ENCODER_TARGETS,
            "ignore": [],
            "global_sparsity": True,
            "max_layer_sparsity": 0.98,
            **pruning,
        },
        "curvature": curvature,
    }

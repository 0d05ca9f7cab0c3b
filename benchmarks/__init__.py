"""Benchmarks of fls_hf: one module per study, run from the repository root as `python -m benchmarks.<study>`.

Shared helpers (data, cached dense models, result rows, plots, `--set` overrides) live in `benchmarks.common`;
results go to benchmarks/results/, dense models to benchmarks/cache/ (not committed). See benchmarks/README.md.
"""

import os

# Every study runs offline (the model and data ship with packages); set before any study imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

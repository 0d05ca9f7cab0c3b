"""The package layout holds: folders are layers and imports only run down; benchmarks use public names only;
every recipe key an error message names exists.

Layers, bottom to top: plumbing (errors, distributed, progress, data) → model → fisher → curvature → recipe →
pruning → export → entry points (trainer, callback, oneshot, peft). A module may import its own layer or any
below it, never above; the import graph (every import, including those inside functions) has no cycle.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from fls_hf.curvature import config_class_for, registered_methods
from fls_hf.recipe import PruningConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fls_hf"
LAYERS = ["plumbing", "model", "fisher", "curvature", "recipe", "pruning", "export", "entry"]
PLUMBING = {"errors", "distributed", "progress", "data"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    head = module.split(".")[1] if "." in module else "entry"
    if head in PLUMBING:
        return 0
    return LAYERS.index(head) if head in LAYERS else LAYERS.index("entry")


def imports(path: Path) -> set[str]:
    """fls_hf modules imported anywhere in the file (relative imports resolved; `from pkg import mod` → pkg.mod)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("fls_hf"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(
                    candidate
                    if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                    or (PACKAGE.parent / candidate.replace(".", "/")).is_dir()
                    else base
                )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fls_hf")}
    return found - {name}


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}


def test_imports_only_run_down_the_layers():
    upward = sorted(
        f"{a} → {b}" for a, targets in GRAPH.items() for b in targets if b != "fls_hf" and layer(b) > layer(a)
    )
    assert not upward
    assert not [a for a, targets in GRAPH.items() if "fls_hf" in targets], "no module imports the package root"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state:
            assert visit(start, []) is None


def test_the_root_imports_the_trainer_only_when_asked():
    """`from fls_hf import oneshot` (every pruning child process) must not pay for transformers' Trainer and PEFT
    (a fresh process checks it); the trainer still resolves by name, and an unknown name is an AttributeError."""
    probe = (
        "import sys, fls_hf\n"
        "from fls_hf import load_recipe, oneshot, shrink, sparsity_report\n"
        "heavy = ('peft', 'transformers.trainer', 'fls_hf.trainer', 'fls_hf.callback')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"

    import fls_hf  # here, where the Trainer is imported already: resolving the lazy names costs nothing

    assert fls_hf.FishLegPruningTrainer.__module__ == "fls_hf.trainer"
    with pytest.raises(AttributeError, match="'Trainer'"):
        fls_hf.Trainer
    assert set(fls_hf._LAZY) <= set(fls_hf.__all__) <= set(dir(fls_hf))


# benchmarks/scale.py is a profiler: in its own child process it wraps these internal modules' phase functions by
# name to time them (fls_hf's code unchanged); it uses no internal name otherwise. benchmarks/cg_preconditioner.py
# studies the cg solver itself: it records the layer problems `obc` hands to it and solves them three ways.
PROFILED = {
    ("cg_preconditioner.py", "fls_hf.pruning", "conjugate_gradient"),
    ("cg_preconditioner.py", "fls_hf.pruning", "obc"),
    ("scale.py", "fls_hf.curvature", "kfac"),
    ("scale.py", "fls_hf.curvature.fishleg", "warm_start"),
    ("scale.py", "fls_hf.pruning", "pruner"),
    ("scale.py", "fls_hf.pruning", "surgeon"),
    ("structured_first_order.py", "fls_hf.pruning", "structured"),
}


def test_benchmarks_import_only_public_names():
    """From `fls_hf` or a module with `__all__` (a sub-package's face, or `fls_hf.recipe`), names it lists."""
    wrong = []
    for path in sorted(
        p
        for p in (REPO / "benchmarks").rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.startswith("fls_hf.") for a in node.names):
                wrong.append(f"{path.name}: import {', '.join(a.name for a in node.names)}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fls_hf"):
                public = getattr(importlib.import_module(node.module), "__all__", None)
                hidden = [
                    a.name
                    for a in node.names
                    if (public is None or a.name not in public) and (path.name, node.module, a.name) not in PROFILED
                ]
                if hidden:
                    wrong.append(f"{path.relative_to(REPO)}: from {node.module} import {', '.join(hidden)}")
    assert not wrong


def recipe_keys() -> set[str]:
    keys = {f"pruning.{f.name}" for f in fields(PruningConfig)}
    for method in registered_methods():
        keys |= {f"curvature.{f.name}" for f in fields(config_class_for(method))}
    return keys


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_named_recipe_key_exists(path):
    """Error messages and docs name keys as `pruning.x` / `curvature.x`: each must be a real key."""
    named = set(re.findall(r"`((?:pruning|curvature)\.[a-z_]+)", path.read_text()))
    assert named <= recipe_keys(), sorted(named - recipe_keys())


def test_every_config_documents_its_keys():
    """PEFT-style configs: each key a config class adds is described in its docstring's `Args:` section."""
    classes = {PruningConfig} | {config_class_for(m) for m in registered_methods()}
    classes |= {base for cls in list(classes) for base in cls.__mro__ if hasattr(base, "__dataclass_fields__")}
    for cls in classes:
        parent_fields = {
            f.name for base in cls.__mro__[1:] if hasattr(base, "__dataclass_fields__") for f in fields(base)
        }
        for f in fields(cls):
            if f.name not in parent_fields:
                assert f"        {f.name} (`" in (cls.__doc__ or ""), f"{cls.__name__}.{f.name}"

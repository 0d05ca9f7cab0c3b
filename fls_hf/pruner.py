"""The pruning lifecycle for one model and one recipe; callers decide *when*, this decides *what*.

    pruner = Pruner(model, recipe)        # resolve targets, build curvature + masks + schedule
    pruner.prune_to(model, 0.5, batches)  # curvature ready → saliency → masks → compensation
    pruner.zero_pruned_grads()            # before optimizer.step()
    pruner.enforce_masks()                # after optimizer.step()
    pruner.on_step(model, step, batches)  # gradual schedule: refine, prune when due
    pruner.save(directory) / pruner.load(directory)

Curvature data comes from a `CalibrationStream` (see `calibration.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .calibration import CalibrationStream, as_stream
from .curvature import provider_class_for
from .curvature.forward import unwrap
from .distributed import check_same_on_all_ranks
from .errors import PruningStateError, RecipeError
from .progress import log_main
from .pruning.masks import MaskSet
from .pruning.patterns import parse_mask_type
from .pruning.schedule import SparsitySchedule, recomputation_targets
from .pruning.surgeon import prune_step
from .recipe import PruningRecipe, load_recipe
from .targets import resolve_targets

STATE_TENSORS = "fls_pruner.safetensors"
STATE_META = "fls_pruner.json"
STATE_VERSION = 1


class Pruner:
    """Masks, curvature and schedule for the layers a recipe targets.

    Args:
        model: the model to prune (DDP / compiled wrappers are unwrapped).
        recipe: a `PruningRecipe`, a path, a YAML string or a dict.
    """

    def __init__(self, model: nn.Module, recipe: PruningRecipe | Mapping[str, Any] | str | Path) -> None:
        self.recipe = load_recipe(recipe)
        cfg = self.recipe.pruning
        self.layers = resolve_targets(unwrap(model), cfg.targets, cfg.ignore)
        if not self.layers:
            raise RecipeError(
                f"recipe keys `pruning.targets` / `pruning.ignore` leave no supported layer in {type(unwrap(model)).__name__}"
            )
        self.pattern = parse_mask_type(cfg.mask_type)
        for name, adapter in self.layers.items():
            self.pattern.check_layer(name, adapter.shape)
        self.schedule = SparsitySchedule(
            cfg.init_sparsity, cfg.final_sparsity, cfg.start_step, cfg.end_step, cfg.update_frequency, cfg.inter_func
        )
        self.provider = provider_class_for(cfg.method)(self.layers, self.recipe.curvature)
        self.masks = MaskSet.dense(self.layers)
        self.curvature_ready = False
        self._fresh_curvature = False
        self.current_target = 0.0
        self.skipped_steps = 0  # optimizer updates dropped for non-finite gradients (see `non_finite_grads`)
        self.history: list[dict[str, float]] = []
        self.last_diagnostics: dict[str, float] = {}
        log_main("fls_hf: pruning %d layers with method %s", len(self.layers), cfg.method)

    # ------------------------------------------------------------------ curvature
    def _ready_curvature(self, model: nn.Module, stream: CalibrationStream) -> None:
        """Estimate (first time, or every time for non-learned baselines) or refine the curvature."""
        cfg = self.recipe.curvature
        if self._fresh_curvature:  # adopted from a pass made elsewhere for this very model state
            self._fresh_curvature = False
            return
        if not self.curvature_ready or not getattr(self.provider, "refines", False):
            self.last_diagnostics = self.provider.prepare(model, stream)
            self.curvature_ready = True
        else:
            if getattr(cfg, "rewarm", False):
                self.provider.restart(model, stream.take(cfg.num_batches))
            steps = getattr(cfg, "refinement_steps", 0)
            self.last_diagnostics = self.provider.refine(model, stream.take(cfg.num_batches), steps) if steps else {}

    def adopt_curvature(self, state: Mapping[str, Any]) -> None:
        """Use a provider state estimated on this model as it is now (e.g. one pass reused for several targets)."""
        self.provider.load_state_dict(state)
        self.curvature_ready = self._fresh_curvature = True

    def refine_once(self, model: nn.Module, stream: CalibrationStream) -> None:
        """One aux step between pruning steps (learned providers only)."""
        if self.curvature_ready and getattr(self.provider, "refines", False):
            self.last_diagnostics = self.provider.update(model, stream.next())

    # ------------------------------------------------------------------ pruning
    def prune_to(self, model: nn.Module, target: float, batches: Iterable[Mapping[str, Any]] | CalibrationStream) -> None:
        """Prune (with `recomputations` curvature updates) until the targeted layers reach `target`."""
        stream = as_stream(batches)
        cfg = self.recipe.pruning
        for sub_target in recomputation_targets(self.current_target, target, cfg.recomputations):
            self._ready_curvature(model, stream)
            prune_step(
                self.provider, self.layers, self.masks, sub_target, self.pattern,
                global_scope=cfg.global_sparsity, compensation=cfg.compensation, block_size=cfg.obs_block_size,
                min_sparsity=cfg.min_layer_sparsity, max_sparsity=cfg.max_layer_sparsity, saliency=cfg.saliency,
            )
            self.current_target = sub_target
        check_same_on_all_ranks(self.masks.digest(), "pruning masks")
        self.history.append({"target": target, "sparsity": self.masks.global_sparsity()})
        log_main("fls_hf: pruned to %.2f %% (target %.2f %%)", 100 * self.masks.global_sparsity(), 100 * target)

    def on_step(self, model: nn.Module, step: int, stream: CalibrationStream) -> bool:
        """After optimizer step `step`: prune if the schedule is due (or behind), else maybe refine.

        Returns True when a pruning step ran.
        """
        target = self.schedule.target(step) if step >= self.schedule.start_step else None
        if target is not None and target > self.current_target and (self.schedule.is_pruning_step(step) or step > self.schedule.end_step):
            self.prune_to(model, target, stream)
            return True
        every = getattr(self.recipe.curvature, "refine_every", 0)
        if every and step % every == 0:
            self.refine_once(model, stream)
        return False

    # ------------------------------------------------------------------ masks
    def zero_pruned_grads(self) -> None:
        self.masks.zero_grads(self.layers)

    def enforce_masks(self) -> None:
        self.masks.apply(self.layers)

    def non_finite_grads(self) -> list[str]:
        """Targeted modules whose weight or bias gradient holds NaN / inf (one device sync for all)."""
        names, finite = [], []
        for name, adapter in self.layers.items():
            grads = [p.grad for p in (adapter.weight, adapter.bias) if p is not None and p.grad is not None]
            if grads:
                names.append(name)
                finite.append(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if not finite:
            return []
        flags = torch.stack([f.to(finite[0].device) for f in finite]).tolist()
        return [name for name, ok in zip(names, flags) if not ok]

    def logs(self) -> dict[str, float]:
        """Scalars for the Trainer's reporting."""
        out = {"sparsity": self.masks.global_sparsity(), "sparsity_target": self.current_target}
        for key in ("aux_loss", "residual", "aux_steps"):
            if key in self.last_diagnostics:
                out[f"curvature_{key}"] = self.last_diagnostics[key]
        if self.skipped_steps:
            out["skipped_non_finite_steps"] = float(self.skipped_steps)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        masks, provider = self.masks.state_dict(), self.provider.state_dict()
        tensors = {f"masks/{k}": v for k, v in masks["tensors"].items()}
        tensors.update({f"curvature/{k}": v.contiguous() for k, v in provider["tensors"].items()})
        meta = {
            "version": STATE_VERSION, "recipe": self.recipe.to_dict(), "masks": masks["meta"],
            "curvature": provider.get("meta", {}), "curvature_ready": self.curvature_ready,
            "current_target": self.current_target, "history": self.history, "skipped_steps": self.skipped_steps,
        }
        return tensors, meta

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state_dict()
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(directory / STATE_TENSORS))
        (directory / STATE_META).write_text(json.dumps(meta, indent=1))

    def load(self, directory: str | Path) -> None:
        """Restore masks, curvature and schedule position; refuses missing, truncated or pickled state."""
        directory = Path(directory)
        tensor_file, meta_file = directory / STATE_TENSORS, directory / STATE_META
        if not tensor_file.is_file() or not meta_file.is_file():
            raise PruningStateError(f"no pruner state in {directory}: expected {STATE_TENSORS} and {STATE_META}")
        try:
            tensors = load_file(str(tensor_file))
            meta = json.loads(meta_file.read_text())
        except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as exc:
            raise PruningStateError(f"pruner state in {directory} is unreadable or truncated: {exc}") from exc
        if meta.get("version") != STATE_VERSION:
            raise PruningStateError(f"pruner state version {meta.get('version')!r} in {directory}; expected {STATE_VERSION}")
        split = {"masks": {}, "curvature": {}}
        for key, value in tensors.items():
            section, _, rest = key.partition("/")
            split.setdefault(section, {})[rest] = value
        _refuse_non_finite(split["curvature"], directory)
        self.masks.load_state_dict({"tensors": split["masks"], "meta": meta["masks"]})
        for name in self.layers:  # the curvature must keep learning on the surviving weights only
            self.provider.mask(name, self.masks.keep_matrix(name))
        self.provider.load_state_dict({"tensors": split["curvature"], "meta": meta.get("curvature", {})})
        self.curvature_ready = bool(meta.get("curvature_ready"))
        self.current_target = float(meta.get("current_target", 0.0))
        self.history = list(meta.get("history", []))
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.enforce_masks()


def _refuse_non_finite(curvature: Mapping[str, torch.Tensor], directory: Path) -> None:
    """A NaN / inf in saved curvature would silently turn every later saliency into "never prune"."""
    bad = sorted(k for k, v in curvature.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise PruningStateError(f"pruner state in {directory} holds non-finite curvature values in {bad[:5]}; refusing to load it")

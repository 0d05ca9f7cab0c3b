"""The pruning lifecycle for one model and one recipe; callers decide *when*, this decides *what*.

    pruner = Pruner(model, recipe)        # resolve targets, build curvature + masks + schedule
    pruner.prune_to(model, 0.5, batches)  # curvature ready → saliency → masks → compensation
    pruner.zero_pruned_grads()            # before optimizer.step()
    pruner.enforce_masks()                # after optimizer.step()
    pruner.on_step(model, step, batches)  # gradual schedule: prune when due, else let the curvature follow
    pruner.save(directory) / pruner.load(directory)

The Pruner never knows which curvature it holds: it calls the provider's `ready` before each pruning step and
`on_optimizer_step` after the others (see `fls_hf/curvature/base.py`). Curvature data comes from a `CalibrationStream`
(`fisher/calibration.py`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..curvature import provider_class_for
from ..distributed import ShardCounts, check_same_on_all_ranks, rank, shard_counts, world_size
from ..errors import DistributedError, PruningStateError, RecipeError
from ..fisher.calibration import CalibrationStream, as_stream
from ..model.adapters import LayerAdapter, local, shard_rows
from ..model.forward import unwrap
from ..model.structures import adapter_factors, pruned_blocks, pruned_layers
from ..progress import log_main, logger
from ..recipe import PruningRecipe, load_recipe
from .groups import prune_groups, removed_groups
from .masks import MaskSet
from .patterns import parse_mask_type
from .schedule import SparsitySchedule, recomputation_targets
from .surgeon import prune_step, rule_mismatch

STATE_TENSORS = "fls_pruner.safetensors"
STATE_META = "fls_pruner.json"
STATE_VERSION = 1
SHARD_TENSORS, SHARD_META = "fls_pruner.rank{rank}.safetensors", "fls_pruner.rank{rank}.json"  # FSDP: per rank
RANK_RNG = "curvature_rng_rank{rank}.safetensors"  # data-parallel runs: each rank's curvature RNG state


class Pruner:
    """Masks, curvature and schedule for the layers a recipe targets.

    Args:
        model: the model to prune (DDP / compiled wrappers are unwrapped).
        recipe: a `PruningRecipe`, a path, a YAML string or a dict.
    """

    def __init__(self, model: nn.Module, recipe: PruningRecipe | Mapping[str, Any] | str | Path) -> None:
        self.recipe = recipe if isinstance(recipe, PruningRecipe) else load_recipe(recipe)  # parsed once, upstream
        cfg = self.recipe.pruning
        self.blocks = pruned_blocks(unwrap(model), cfg)  # neurons / heads: the blocks targets / ignore leave
        self.layers = pruned_layers(unwrap(model), cfg)
        if not self.layers:
            raise RecipeError(
                f"recipe keys `pruning.targets` / `pruning.ignore` leave no supported layer in "
                f"{type(unwrap(model)).__name__}"
            )
        self.shards = _shards_for(self.layers, cfg.method)  # FSDP2: None when the weights are whole
        if self.shards is not None and self.blocks and getattr(self.recipe.curvature, "first_order", False):
            raise DistributedError(
                "recipe key `curvature.first_order` is not supported under FSDP (the data-label gradient is taken "
                "whole): leave it off, or prune structures unsharded"
            )
        # PEFT: the LoRA factors that carry each block's groups, zeroed with them (`adapter_factors`)
        self.adapter_factors = [(b, f) for b in self.blocks for f in adapter_factors(unwrap(model), b)]
        self.pattern = parse_mask_type(cfg.mask_type)
        for name, adapter in self.layers.items():
            self.pattern.check_layer(name, adapter.shape)
        self.schedule = SparsitySchedule(
            cfg.init_sparsity,
            cfg.final_sparsity,
            cfg.start_step,
            cfg.last_step,
            cfg.update_frequency or 1,
            cfg.inter_func,
        )
        if cfg.one_shot and cfg.init_sparsity > 0:
            warnings.warn(
                f"recipe key `pruning.init_sparsity` = {cfg.init_sparsity!r} has no effect: the schedule is one-shot "
                f"(`pruning.end_step` {'unset' if cfg.end_step is None else '= `pruning.start_step`'}), so it prunes "
                f"to `pruning.final_sparsity` = {cfg.final_sparsity!r} at once; set `pruning.end_step` for a gradual "
                "schedule (in the Trainer, leave it unset to spread pruning over the run)",
                UserWarning,
                stacklevel=3,
            )
        provider_class = provider_class_for(cfg.method)
        has_rows = provider_class.holds_row_model(self.recipe.curvature)
        if cfg.compensation == "obc" and not has_rows:
            raise RecipeError(
                "recipe key `pruning.compensation` = 'obc' needs a curvature with a row-wise model; "
                f"`pruning.method` = {cfg.method!r}"
                + (
                    f" with `curvature.structure` = {self.recipe.curvature.structure!r}"
                    if cfg.method == "fishleg"
                    else ""
                )
                + " has none: use `pruning.method: kfac` (or `fishleg` with `curvature.structure: kronecker`)"
            )
        # `auto`: the rule that fits the curvature (issue 17): row-wise OBC where there is a row model
        self.compensation = cfg.compensation if cfg.compensation != "auto" else ("obc" if has_rows else "block")
        if self.blocks:  # group OBS reads the consumers' Kronecker factors only (G, Ā)
            self.compensation = "group"
            consumers = {b.consumer: self.layers[b.consumer] for b in self.blocks}
            self.provider = provider_class(consumers, self.recipe.curvature.for_rule("group"))
        else:
            self.provider = provider_class(self.layers, self.recipe.curvature.for_rule(self.compensation))
        mismatch = not self.blocks and rule_mismatch(self.provider.coupled_block, cfg.saliency, self.compensation)
        if mismatch:
            warnings.warn(f"recipe with `pruning.method` = {cfg.method!r}: {mismatch}", UserWarning, stacklevel=3)
        self.provider.shards = self.shards
        # `curvature.statistics: training`: the Trainer callback feeds K-FAC sums from the training steps before each
        # pruning step (`statistics_window` of them); `_ready_curvature` uses them instead of a pass when complete
        self.training_statistics = self.provider.training_statistics()
        self.statistics_window = 0
        self._from_training = False
        self.masks = MaskSet.dense(self.layers)
        self.masks.shards = self.shards
        self._adopted = False
        self.current_target = 0.0
        self.skipped_steps = 0  # optimizer updates dropped for non-finite gradients (see `non_finite_grads`)
        self.history: list[dict[str, float]] = []
        self.last_diagnostics: dict[str, float] = {}
        log_main("fls_hf: pruning %d layers with method %s", len(self.layers), cfg.method)

    # ------------------------------------------------------------------ curvature
    def _ready_curvature(self, model: nn.Module, stream: CalibrationStream, gap: int | None) -> None:
        if self._adopted:  # adopted from a pass made elsewhere for this very model state
            self._adopted = False
            return
        stats = self.training_statistics
        if stats is not None:  # a complete window serves once; an incomplete one (the first pruning step, a resume
            # inside a window) is dropped and the pass below takes its place
            needed = self._window_needed(gap)
            complete = needed and stats.steps >= needed
            diagnostics = self.provider.ready_from_training(stats) if complete else None
            stats.reset()
            if diagnostics is not None:
                self.last_diagnostics, self._from_training = diagnostics, True
                return
        self.last_diagnostics = self.provider.ready(model, stream)

    def _window_needed(self, gap: int | None) -> int:
        """Training steps a window must hold to serve this pruning step: `statistics_window`, or all the steps since
        the previous pruning step where the schedule spaces them closer (e.g. a last step at an `end_step` off the
        `update_frequency` grid) but no closer than half the window; 0: a pass."""
        window = self.statistics_window
        if gap is None or gap >= window:
            return window
        return gap if 2 * gap >= window else 0

    def collects_statistics(self, step: int) -> bool:
        """Whether the training step that ends at optimizer step `step` feeds the next pruning step's K-FAC
        statistics (`curvature.statistics: training`: the `statistics_window` steps up to a pruning step)."""
        if self.training_statistics is None or not self.statistics_window:
            return False
        upcoming = [p for p in self.schedule.pruning_steps() if p >= step and self.schedule.target(p) > 0]
        return bool(upcoming) and upcoming[0] - step < self.statistics_window

    def adopt_curvature(self, state: Mapping[str, Any]) -> None:
        """Use a provider state estimated on this model as it is now, instead of the next `ready`.

        For studies that reuse one curvature pass for several targets (`benchmarks/`): the state is
        `provider.state_dict()` of a provider of the same method, layers and config.
        """
        self.provider.load_state_dict(state)
        self._adopted = True

    # ------------------------------------------------------------------ pruning
    def prune_to(
        self,
        model: nn.Module,
        target: float,
        batches: Iterable[Mapping[str, Any]] | CalibrationStream,
        *,
        steps_since_pruning: int | None = None,
    ) -> None:
        """Prune (curvature made ready before each of the `recomputations` stages) until the layers reach `target`.

        `steps_since_pruning`: optimizer steps since the previous pruning step (None: none before), which sizes the
        training-statistics window that may serve this one (`_window_needed`; the Trainer's `on_step` passes it).
        """
        stream = as_stream(batches)
        cfg = self.recipe.pruning
        self._from_training = False
        for sub_target in recomputation_targets(self.current_target, target, cfg.recomputations):
            self._ready_curvature(model, stream, steps_since_pruning)
            if self.blocks:
                for kind in cfg.structure_kinds:  # neurons+heads: each kind its own share (and threshold)
                    prune_groups(
                        self.provider,
                        self.layers,
                        self.masks,
                        [b for b in self.blocks if b.kind == kind],
                        cfg.structure_share(kind, sub_target),
                        rule=cfg.method,
                        global_scope=cfg.global_sparsity,
                        damping=self.recipe.curvature.damping,
                        max_sparsity=cfg.max_layer_sparsity,
                        shards=self.shards,
                    )
                self.current_target = sub_target
                continue
            prune_step(
                self.provider,
                self.layers,
                self.masks,
                sub_target,
                self.pattern,
                global_scope=cfg.global_sparsity,
                compensation=self.compensation,
                block_size=cfg.obs_block_size,
                min_sparsity=cfg.min_layer_sparsity,
                max_sparsity=cfg.max_layer_sparsity,
                saliency=cfg.saliency,
                obc_rounds=cfg.obc_rounds,
                obc_solver=cfg.obc_solver,
                shards=self.shards,
            )
            self.current_target = sub_target
        self._zero_removed_adapter_entries()
        if self.shards is None:  # sharded: each rank holds other rows, chosen by counts over all of them
            check_same_on_all_ranks(self.masks.digest(), "pruning masks")
        entry = {"target": target, "sparsity": self.masks.global_sparsity()}
        if self.training_statistics is not None:  # 1: this step's first K-FAC estimate came from the training steps
            entry["training_statistics"] = float(self._from_training)
        self.history.append(entry)
        log_main("fls_hf: pruned to %.2f %% (target %.2f %%)", 100 * self.masks.global_sparsity(), 100 * target)

    def on_step(self, model: nn.Module, step: int, stream: CalibrationStream) -> bool:
        """After optimizer step `step`: prune if the schedule is due (or behind), else maybe refine.

        Returns True when a pruning step ran.
        """
        target = self.schedule.target(step) if step >= self.schedule.start_step else None
        if (
            target is not None
            and target > self.current_target
            and (self.schedule.is_pruning_step(step) or step > self.schedule.end_step)
        ):
            earlier = [p for p in self.schedule.pruning_steps() if p < step]
            self.prune_to(model, target, stream, steps_since_pruning=step - earlier[-1] if earlier else None)
            return True
        diagnostics = self.provider.on_optimizer_step(model, stream, step)
        if diagnostics:
            self.last_diagnostics = diagnostics
        return False

    # ------------------------------------------------------------------ masks
    def zero_pruned_grads(self) -> None:
        self.masks.zero_grads(self.layers)
        self._zero_removed_adapter_entries(grads=True)

    def enforce_masks(self) -> None:
        self.masks.apply(self.layers)
        self._zero_removed_adapter_entries()

    @torch.no_grad()
    def _zero_removed_adapter_entries(self, grads: bool = False) -> None:
        """Zero the removed groups' entries of the LoRA factors (or of their gradients) that carry them."""
        removed: dict[str, torch.Tensor] = {}
        for block, (tensor, dim, producer) in self.adapter_factors:
            if block.key not in removed:
                removed[block.key] = torch.nonzero(removed_groups(self.masks, block)).flatten()
            gone, target = removed[block.key], tensor.grad if grads else tensor
            if target is not None and len(gone):
                index = block.consumer_columns(gone) if producer < 0 else block.producer_rows(producer, gone)
                if dim == 0:  # FSDP2: lora_B's rows are sharded like its producer's; this rank's in its own numbers
                    start, stop = shard_rows(target, "a LoRA factor")
                    index = index[(index >= start) & (index < stop)] - start
                held = local(target)
                held.index_fill_(dim, index.to(held.device), 0.0)

    def non_finite_grads(self) -> list[str]:
        """Targeted modules whose weight or bias gradient holds NaN / inf (one device sync for all)."""
        names, sums = [], []
        for name, adapter in self.layers.items():
            grads = [local(p.grad) for p in (adapter.weight, adapter.bias) if p is not None and p.grad is not None]
            if grads:
                names.append(name)
                # NaN / inf reach the sum (inf − inf is NaN): one read of each gradient, no per-element flags
                sums.append(sum(g.sum(dtype=torch.float32) for g in grads))
        if not sums:
            return []
        flags = torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).tolist()
        if self.shards is not None:
            flags = self.shards.all_ok(flags)
        return [name for name, ok in zip(names, flags) if not ok]

    def logs(self) -> dict[str, float]:
        """Scalars for the Trainer's reporting."""
        out = {"sparsity": self.masks.global_sparsity(), "sparsity_target": self.current_target}
        for key in ("aux_loss", "residual", "aux_steps", "damping"):
            if key in self.last_diagnostics:
                out[f"curvature_{key}"] = self.last_diagnostics[key]
        if self.skipped_steps:
            out["skipped_non_finite_steps"] = float(self.skipped_steps)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        masks, curvature = self.masks.state_dict(), self.provider.state_dict()
        tensors = {f"masks/{k}": v for k, v in masks["tensors"].items()}
        tensors.update({f"curvature/{k}": v.contiguous() for k, v in curvature["tensors"].items()})
        meta = {
            "version": STATE_VERSION,
            "recipe": self.recipe.to_dict(),
            "masks": masks["meta"],
            "curvature": curvature.get("meta", {}),
            "current_target": self.current_target,
            "history": self.history,
            "skipped_steps": self.skipped_steps,
        }
        return tensors, meta

    def save(self, directory: str | Path) -> None:
        """Masks, curvature and schedule position as safetensors + JSON. Under FSDP every rank must call it: each
        writes its own rows (`fls_pruner.rank{r}.*`), as distributed checkpoints do."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state_dict()
        if self.shards is not None:
            meta["shard"] = self._shard_meta()
        tensor_file, meta_file = self._state_files(directory)
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tensor_file))
        meta_file.write_text(json.dumps(meta, indent=1))

    def _state_files(self, directory: Path) -> tuple[Path, Path]:
        if self.shards is None:
            return directory / STATE_TENSORS, directory / STATE_META
        rank = self.shards.rank
        return directory / SHARD_TENSORS.format(rank=rank), directory / SHARD_META.format(rank=rank)

    def _shard_meta(self) -> dict[str, int] | None:
        """Which rows this pruner's state holds: rank r of N FSDP shards; None when unsharded."""
        return None if self.shards is None else {"rank": self.shards.rank, "world_size": self.shards.size}

    def _check_shard(self, meta: Mapping[str, Any], directory: Path) -> None:
        """The state must hold this rank's rows of the same number of shards (re-sharding is not supported)."""
        saved, here = meta.get("shard"), self._shard_meta()
        if saved != here:
            raise PruningStateError(
                f"pruner state in {directory} was saved "
                + (f"as rank {saved['rank']} of {saved['world_size']} FSDP shards" if saved else "unsharded")
                + " but is loaded "
                + (f"as rank {here['rank']} of {here['world_size']}" if here else "unsharded")
                + ": load it with the sharding it was saved with"
            )

    def save_rank_rng(self, directory: str | Path) -> None:
        """This rank's curvature RNG state beside the pruner state, under data parallelism (ranks draw their own
        labels and u; `save` holds the main process's only). Every rank calls it; one process writes nothing."""
        if world_size() == 1:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"rng": self.provider.rng_state().cpu()}, str(directory / RANK_RNG.format(rank=rank())))

    def _load_rank_rng(self, directory: Path) -> None:
        path = directory / RANK_RNG.format(rank=rank())
        if path.is_file():
            try:
                self.provider.load_rng_state(load_file(str(path))["rng"])
            except (SafetensorError, KeyError, OSError) as exc:
                raise PruningStateError(f"curvature RNG state {path} is unreadable or truncated: {exc}") from exc
        elif rank() > 0:  # the main state holds rank 0's draws, not this rank's
            logger.warning(
                "fls_hf: no curvature RNG state for rank %d in %s (saved by another world size?): this rank's "
                "sampled labels and u restart from its seed",
                rank(),
                directory,
            )
            self.provider.load_rng_state(None)

    def load(self, directory: str | Path) -> None:
        """Restore masks, curvature and schedule position; refuses missing, truncated or pickled state."""
        directory = Path(directory)
        tensor_file, meta_file = self._state_files(directory)
        if not tensor_file.is_file() or not meta_file.is_file():
            shards = sorted(p.name for p in directory.glob(SHARD_META.format(rank="*")))
            held = (
                f"; it holds FSDP-sharded state ({len(shards)} rank file(s): {shards[0]}, ...), which loads only "
                "under the sharding it was saved with"
                if shards and self.shards is None
                else ""
            )
            raise PruningStateError(
                f"no pruner state in {directory}: expected {tensor_file.name} and {meta_file.name}{held}"
            )
        try:
            tensors = load_file(str(tensor_file))
            meta = json.loads(meta_file.read_text())
        except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as exc:
            raise PruningStateError(f"pruner state in {directory} is unreadable or truncated: {exc}") from exc
        if meta.get("version") != STATE_VERSION:
            raise PruningStateError(
                f"pruner state version {meta.get('version')!r} in {directory}; expected {STATE_VERSION}"
            )
        self._check_shard(meta, directory)
        split = {"masks": {}, "curvature": {}}
        for key, value in tensors.items():
            section, _, rest = key.partition("/")
            split.setdefault(section, {})[rest] = value
        _refuse_non_finite(split["curvature"], directory)
        self.masks.load_state_dict({"tensors": split["masks"], "meta": meta["masks"]})
        for name in self.layers:  # the curvature must keep learning on the surviving weights only
            self.provider.mask(name, self.masks.keep_matrix(name))
        self.provider.load_state_dict({"tensors": split["curvature"], "meta": meta.get("curvature", {})})
        if world_size() > 1 and self.shards is None:  # sharded state holds this rank's generator itself
            self._load_rank_rng(directory)
        self.current_target = float(meta.get("current_target", 0.0))
        self.history = list(meta.get("history", []))
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.enforce_masks()


SHARDABLE_METHODS = ("magnitude", "kfac")  # every rule they use is row-wise (kfac: diag G, Ā all-reduced)


def _shards_for(layers: Mapping[str, LayerAdapter], method: str) -> ShardCounts | None:
    """`shard_counts` of the targeted layers, refusing methods that need whole weights under FSDP."""
    shards = shard_counts(layers)
    if shards is not None and method not in SHARDABLE_METHODS:
        raise DistributedError(
            f"`pruning.method: {method}` needs whole weights (per-example gradients or Fisher products of the "
            f"weights), which FSDP shards; under FSDP use {' or '.join(SHARDABLE_METHODS)} (kfac: row-wise OBC)"
        )
    return shards


def _refuse_non_finite(curvature: Mapping[str, torch.Tensor], directory: Path) -> None:
    """A NaN / inf in saved curvature would silently turn every later saliency into "never prune"."""
    bad = sorted(k for k, v in curvature.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise PruningStateError(
            f"pruner state in {directory} holds non-finite curvature values in {bad[:5]}; refusing to load it"
        )

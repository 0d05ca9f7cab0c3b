"""`FishLegPruningCallback`: FishLeg Surgeon pruning for a stock `transformers.Trainer` (or any subclass).

Hooks (transformers 5 loop: forward/backward × grad-accum → clip → on_pre_optimizer_step →
optimizer.step() → on_optimizer_step → lr step → zero_grad → global_step += 1 → on_step_end):

- `on_train_begin`: fix the schedule (a recipe without `end_step` prunes over the first 3/4 of the run); build
  the pruner; restore its state when resuming; prune if the schedule starts at step 0.
- `on_pre_optimizer_step`: zero the gradients of pruned weights; a NaN / inf gradient in a targeted layer
  drops the whole update (warned, counted), so no non-finite value reaches the weights or the masks.
- `on_optimizer_step`: re-zero pruned weights (momentum and weight decay would regrow them).
- `on_step_end`: prune when the schedule is due (counted in optimizer steps, so gradient accumulation
  is handled), else refine the curvature at `curvature.refine_every`; nothing on a step the fp16 scaler skipped
  (read off the loss scale, see `_loss_scale`).
- `on_log`: sparsity and curvature diagnostics join the periodic training logs (not `evaluate()` or
  `train()` metrics).
- `on_save`: pruner state (masks, curvature, schedule position) into the checkpoint, without pickle.
- `on_train_end`: `recipe.yaml` and `sparsity_report.json` into `output_dir`; a warning with the number of
  updates dropped for non-finite gradients, if any; on a PEFT model whose pruned
  layers carry adapters, a one-time warning that a plain `merge_and_unload()` would densify them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .distributed import is_main_process, rank_seed
from .errors import DistributedError, PruningStateError
from .export.artifacts import write_pruning_artifacts
from .fisher.calibration import CalibrationStream, SeededBatches
from .model.forward import unwrap
from .peft import warn_if_merge_densifies
from .progress import log_main, warn_main
from .pruning.pruner import Pruner
from .recipe import PruningRecipe, load_recipe, schedule_over_run

PRUNER_DIR = "fls_pruner"
TRAINER_FSDP_FLAG = "FLS_HF_TRAINER_FSDP"  # opt-in until the Trainer's FSDP path is verified on a GPU (issue 19)


def refuse_sharded_training(args: TrainingArguments, model: nn.Module | None) -> None:
    """FSDP in the Trainer: where accelerate shards the model, refused unless `FLS_HF_TRAINER_FSDP=1` (the path is
    built — every rank saves its rows of the pruner state, the reports sum over the shards — but not yet verified on
    GPUs, where alone accelerate shards); said once where it does not shard (on CPU accelerate runs FSDP settings
    unsharded). DeepSpeed ZeRO-3 shards parameters its own way: refused."""
    if args.fsdp:
        if model is not None and any(isinstance(p, DTensor) for p in model.parameters()):
            if os.environ.get(TRAINER_FSDP_FLAG) != "1":
                raise DistributedError(
                    "FSDP in the Trainer is built in fls_hf but not yet verified on GPUs: set "
                    f"{TRAINER_FSDP_FLAG}=1 to try it, prune a `fully_shard`-ed model with `Pruner` in your own loop "
                    '(README, "Under FSDP"), or run the Trainer with DDP (`accelerate launch --multi_gpu`)'
                )
            warn_main(
                "fls_hf: FSDP in the Trainer (%s=1): sharded pruning, not yet verified on GPUs", TRAINER_FSDP_FLAG
            )
            return
        warn_main(
            "fls_hf: FSDP settings were given but the model is not sharded (accelerate shards on GPUs only; on CPU "
            "it runs them as plain data parallelism): every rank holds and prunes whole weights, as under DDP"
        )
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return
    if getattr(args, "deepspeed", None) and is_deepspeed_zero3_enabled():
        raise DistributedError("DeepSpeed ZeRO-3 is not supported by fls_hf yet: use ZeRO-1/2 or DDP")


class FishLegPruningCallback(TrainerCallback):
    """Prune during training according to `recipe`.

    Args:
        recipe: a `PruningRecipe`, a path to a YAML recipe, a YAML string or a dict.
        overrides: dotted-key overrides, e.g. `{"pruning.final_sparsity": 0.8}`.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=train)
        >>> trainer.add_callback(FishLegPruningCallback("recipes/gradual-unstructured-90.yaml"))
        >>> trainer.train()
    """

    def __init__(
        self, recipe: PruningRecipe | Mapping[str, Any] | str | Path, overrides: Mapping[str, Any] | None = None
    ) -> None:
        parsed = isinstance(recipe, PruningRecipe) and not overrides
        self.recipe = recipe if parsed else load_recipe(recipe, overrides=overrides)  # the Trainer passes it parsed
        self.pruner: Pruner | None = None
        self.batches: SeededBatches | CalibrationStream | None = None
        self.merge_warned = False
        self._scale_before_step: float | None = None
        self._dropped_update = False

    def _curvature_data(self, args: TrainingArguments, train_dataloader: Any) -> SeededBatches | CalibrationStream:
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            return SeededBatches(
                dataset, train_dataloader.collate_fn, args.per_device_train_batch_size, rank_seed(args.seed)
            )
        return CalibrationStream(train_dataloader)  # iterable datasets: resume is not bit-exact

    def stream(self, step: int) -> CalibrationStream:
        return self.batches.stream(step) if isinstance(self.batches, SeededBatches) else self.batches

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        refuse_sharded_training(args, model)
        self.recipe = schedule_over_run(self.recipe, state.max_steps)
        self.pruner = Pruner(model, self.recipe)
        self.batches = self._curvature_data(args, train_dataloader)
        if state.global_step > 0:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PRUNER_DIR
            if not checkpoint.is_dir():
                raise PruningStateError(
                    f"resuming at step {state.global_step} but {checkpoint} holds no pruner state; refusing to "
                    "continue as if nothing were pruned"
                )
            self.pruner.load(checkpoint)
            log_main(
                "fls_hf: resumed pruner state from %s (sparsity %.2f %%)",
                checkpoint,
                100 * self.pruner.masks.global_sparsity(),
            )
        else:
            self.pruner.on_step(model, 0, self.stream(0))
        self._setup_training_statistics(args, model)

    def _setup_training_statistics(self, args: TrainingArguments, model: nn.Module) -> None:
        """`curvature.statistics: training`: the window is the optimizer steps that see `num_examples` examples
        per rank; gradient checkpointing re-runs forwards inside the backward, so it takes passes instead."""
        if self.pruner.training_statistics is None:
            return
        bare = unwrap(model)
        checkpointing = getattr(bare, "is_activation_checkpointing", None)  # transformers ≥ 5.2x; older: the other
        if checkpointing is None:
            checkpointing = getattr(bare, "is_gradient_checkpointing", False)
        if args.gradient_checkpointing or checkpointing:
            warn_main(
                "fls_hf: recipe key `curvature.statistics` = 'training' does not work with gradient checkpointing "
                "(forwards re-run inside the backward); K-FAC statistics come from a pass before each pruning step"
            )
            self.pruner.training_statistics = None
            return
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.pruner.statistics_window = -(-self.recipe.curvature.num_examples // per_step)

    def on_step_begin(self, args, state, control, model: nn.Module = None, **kwargs):
        stats = self.pruner.training_statistics
        if stats is not None and self.pruner.collects_statistics(state.global_step + 1):
            stats.attach(model)

    def on_pre_optimizer_step(self, args, state, control, model: nn.Module = None, optimizer: Any = None, **kwargs):
        self._scale_before_step = _loss_scale(optimizer)
        self._dropped_update = False
        if not args.fp16:  # fp16's GradScaler skips non-finite steps itself, and needs the gradients to do so
            self._dropped_update = self._drop_non_finite_update(model, state.global_step + 1)
        self.pruner.zero_pruned_grads()

    def _drop_non_finite_update(self, model: nn.Module, step: int) -> bool:
        """NaN / inf in a targeted layer's gradient: drop every gradient, so the optimizer skips this update.

        Optimizers skip parameters whose `.grad` is None (no momentum, no weight decay), so nothing
        non-finite reaches the weights or the optimizer state. The whole model, not the one layer: the
        Trainer's gradient-norm pass (`clip_grad_norm_`, run even with clipping off) has spread it everywhere.
        """
        bad = self.pruner.non_finite_grads()
        if not bad:
            return False
        for param in model.parameters():
            param.grad = None
        self.pruner.skipped_steps += 1
        count = self.pruner.skipped_steps
        if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th... skip: a diverged run does not warn every step
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            warn_main(
                "fls_hf: non-finite gradient in targeted module(s) %s at optimizer step %d; update skipped (%d so far)",
                shown,
                step,
                count,
            )
        return True

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.enforce_masks()

    def on_step_end(self, args, state, control, model: nn.Module = None, optimizer: Any = None, **kwargs):
        skipped = self._dropped_update or self._update_was_skipped(optimizer)
        stats = self.pruner.training_statistics
        if stats is not None and stats.attached:
            stats.end_step(skipped=skipped, loss_scale=self._scale_before_step)
        if not skipped:
            self.pruner.on_step(model, state.global_step, self.stream(state.global_step))
        if stats is not None and stats.attached and not self.pruner.collects_statistics(state.global_step + 1):
            stats.detach()  # the window is over (a pruning step used it, or the schedule has none ahead)
            stats.reset()

    def _update_was_skipped(self, optimizer: Any) -> bool:
        """Whether the fp16 GradScaler skipped this step's update (non-finite scaled gradients).

        Accelerate's `step_was_skipped` misses skips by fused optimizers (`adamw_torch_fused`, the Trainer's
        CUDA default), which take the scaler's inf flag into their own kernel: the update is skipped but the
        optimizer's step method still runs. The scaler halves its scale exactly when it found an inf.
        """
        before, after = self._scale_before_step, _loss_scale(optimizer)
        return bool(getattr(optimizer, "step_was_skipped", False)) or (
            before is not None and after is not None and after < before
        )

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs):
        if self.pruner is None or logs is None or not {"loss", "learning_rate"} & logs.keys():
            return  # evaluation and end-of-training metrics stay as the Trainer returns them
        extra = self.pruner.logs()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if self.pruner is None:
            return
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PRUNER_DIR
        if self.pruner.shards is not None:  # FSDP: every rank writes its rows (and its generator state)
            self.pruner.save(directory)
            return
        if args.should_save:
            self.pruner.save(directory)
        self.pruner.save_rank_rng(directory)  # every rank, as the Trainer saves its own rng_state_{rank}

    def on_train_end(self, args, state, control, model: nn.Module = None, **kwargs):
        if self.pruner is None:
            return
        self.pruner.enforce_masks()
        if self.pruner.skipped_steps:
            warn_main(
                "fls_hf: %d optimizer update(s) skipped for non-finite gradients in targeted layers",
                self.pruner.skipped_steps,
            )
        if is_main_process() and not self.merge_warned:
            self.merge_warned = warn_if_merge_densifies(model, self.pruner)
        if args.should_save or self.pruner.shards is not None:  # FSDP: the report sums over every rank's rows
            report = write_pruning_artifacts(model, self.recipe, args.output_dir, write=args.should_save)
            log_main("fls_hf: final sparsity %.2f %%\n%s", 100 * report.global_sparsity, report.to_markdown())


def _loss_scale(optimizer: Any) -> float | None:
    """The fp16 GradScaler's current scale (one device sync), or None without an active scaler."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())

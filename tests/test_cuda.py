"""The CUDA paths, run on a GPU when there is one (skipped elsewhere: CI and the CPU machines have none).

- One-shot pruning on CUDA agrees with the same work on CPU for every method and Q structure, and so do
  diagonal-Q aux steps (block and Kronecker aux steps amplify rounding, see their test): a CUDA-vs-CPU
  difference may be no larger than what CPU runs differ by under a 1e-6 relative perturbation of the
  weights (a few fp32 ulps: another accumulation order) or under another `curvature.seed` (sampled labels
  and u are drawn by a generator on the layers' device, so the GPU draws other numbers than the CPU).
- Mixed-precision training on CUDA (fp16 with its GradScaler, bf16 autocast) reaches the exact target
  with finite weights; the pruner's masks and curvature live on the GPU.
- A step the fp16 GradScaler skips neither prunes nor refines; its target is reached at the next
  pruning step (README "During training").
- Checkpoints written from a CUDA run resume on CUDA with the same masks; compressed checkpoints of a
  CUDA model load back exactly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from fls_hf import FishLegPruningTrainer, load_recipe, oneshot, sparsity_report
from fls_hf.compressed import load_compressed, save_compressed
from fls_hf.fisher.calibration import CalibrationStream
from fls_hf.pruning.pruner import Pruner

from helpers import row_losses, tiny_bert, token_batches, wide_row_problem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")

ONESHOT_CURVATURE = {
    "magnitude": {},
    "diagonal_fisher": {"num_grads": 16},
    "block_fisher": {"num_grads": 16, "block_size": 8},
    "fishleg-diagonal": {"structure": "diagonal", "warmup_steps": 0, "refinement_steps": 0},
    "fishleg-block_diagonal": {
        "structure": "block_diagonal",
        "block_size": 8,
        "warmup_steps": 0,
        "refinement_steps": 0,
    },
    "fishleg-kronecker": {"structure": "kronecker", "warmup_steps": 0, "refinement_steps": 0},
}


def oneshot_recipe(variant: str, seed: int = 0) -> dict:
    method = variant.split("-")[0]
    compensation = "none" if variant in ("fishleg-diagonal", "fishleg-kronecker") else "block"
    return {
        "pruning": {
            "method": method,
            "final_sparsity": 0.7,
            "obs_block_size": 8,
            "compensation": compensation,
            "recomputations": 2,
        },
        "curvature": {"damping": 1e-3, "num_batches": 2, "seed": seed, **ONESHOT_CURVATURE[variant]},
    }


def perturbed_bert(relative: float = 1e-6) -> torch.nn.Module:
    """tiny_bert() with every weight scaled by (1 + relative·N(0, 1)): a few fp32 ulps, the size of the
    differences that another accumulation order (another device) makes, reproduced on CPU."""
    model = tiny_bert()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + relative * torch.randn(param.shape, generator=generator))
    return model


def targeted(model, recipe) -> dict[str, torch.Tensor]:
    layers = Pruner(model, recipe).layers
    return {name: adapter.weight.detach().float().cpu() for name, adapter in layers.items()}


def mask_mismatches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(int(((a[n] == 0) != (b[n] == 0)).sum()) for n in a)


@pytest.mark.parametrize("variant", sorted(ONESHOT_CURVATURE))
def test_oneshot_on_cuda_matches_cpu(variant):
    recipe = oneshot_recipe(variant)
    batches = token_batches(n_batches=4, batch_size=4)  # CPU tensors: the GPU run must move them itself
    runs = {
        "cpu": (tiny_bert(), recipe),
        "cuda": (tiny_bert().to(CUDA), recipe),
        "cpu, perturbed": (perturbed_bert(), recipe),
        "cpu, seed 1": (tiny_bert(), oneshot_recipe(variant, seed=1)),
    }
    reports = {where: oneshot(model, batches, r) for where, (model, r) in runs.items()}
    assert {r.zeros for r in reports.values()} == {round(0.7 * reports["cpu"].numel)}
    weights = {where: targeted(model, recipe) for where, (model, _) in runs.items()}
    on_gpu = mask_mismatches(weights["cpu"], weights["cuda"])
    by_rounding = mask_mismatches(weights["cpu"], weights["cpu, perturbed"])
    by_draws = mask_mismatches(weights["cpu"], weights["cpu, seed 1"])
    print(
        f"{variant}: mask entries differing from CPU: CUDA {on_gpu}, CPU with 1e-6-perturbed weights "
        f"{by_rounding}, CPU with another curvature seed {by_draws}"
    )
    # Near-tied saliencies flip under any rounding. The Kronecker selection on this model is chaotic: relative
    # weight perturbations of 1e-7 / 3e-7 / 1e-6 flip 8 / 214 / 498 of its 4,096 mask entries on CPU.
    assert on_gpu <= max(0.01 * reports["cpu"].numel, 3 * max(by_rounding, by_draws))
    if variant == "fishleg-kronecker":
        return
    draws_move_weights = any(not torch.equal(weights["cpu, seed 1"][n], w) for n, w in weights["cpu"].items())
    for name, cpu_weight in weights["cpu"].items():
        both_kept = (cpu_weight != 0) & (weights["cuda"][name] != 0)
        if not draws_move_weights:  # nothing random in this method: the devices must agree to rounding
            torch.testing.assert_close(
                weights["cuda"][name][both_kept], cpu_weight[both_kept], rtol=1e-3, atol=1e-4, msg=name
            )
            continue
        other = (cpu_weight != 0) & (weights["cpu, seed 1"][name] != 0)
        gpu_gap = (weights["cuda"][name] - cpu_weight)[both_kept].norm() / cpu_weight[both_kept].norm()
        seed_gap = (weights["cpu, seed 1"][name] - cpu_weight)[other].norm() / cpu_weight[other].norm()
        assert gpu_gap <= max(1e-4, 3 * seed_gap), (name, float(gpu_gap), float(seed_gap))


def q_products(model, recipe) -> dict[str, torch.Tensor]:
    """Q·p for a fixed random p, and diag Q, per layer after FishLeg's warm start and aux steps.

    Q itself, not its parameters: block_diagonal's C (Q = S C Cᵀ S) and Kronecker's factors are defined up to
    a rotation / scale that the aux loss cannot see, and Adam drifts along those flat directions differently
    on each device.
    """
    provider = Pruner(model, recipe).provider
    provider.ready(model, CalibrationStream(token_batches(n_batches=4, batch_size=4)))
    generator = torch.Generator().manual_seed(2)
    out = {}
    with torch.no_grad():
        for name, structure in provider.structures.items():
            probe = torch.randn(structure.shape, generator=generator).to(next(structure.parameters()).device)
            out[f"{name} Q·p"] = structure.matvec(probe).float().cpu()
            out[f"{name} diag Q"] = structure.diag().float().cpu()
    return out


def largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)


def test_aux_steps_on_cuda_track_cpu_within_the_draws_noise():
    """Diagonal Q only: its aux steps are stable (a 1e-6 weight perturbation moves Q by ~2e-7 on CPU).

    block_diagonal and Kronecker aux steps amplify rounding: on CPU the same perturbation moves Q·p by 8 % and
    by a factor ~90 after 10 aux steps (Adam's normalised steps along near-flat directions), so a CUDA run
    cannot be expected to follow the CPU trajectory; their K-FAC starts are compared in the one-shot test.
    """
    recipe = {
        "pruning": {"method": "fishleg"},
        "curvature": {"damping": 1e-3, "num_batches": 4, "structure": "diagonal", "warmup_steps": 10},
    }
    on_cpu = q_products(tiny_bert(), recipe)
    on_gpu = largest_relative_difference(on_cpu, q_products(tiny_bert().to(CUDA), recipe))
    by_rounding = largest_relative_difference(on_cpu, q_products(perturbed_bert(), recipe))
    reseeded = {**recipe, "curvature": {**recipe["curvature"], "seed": 1}}
    by_draws = largest_relative_difference(on_cpu, q_products(tiny_bert(), reseeded))
    print(
        f"diagonal: largest relative difference of Q·p or diag Q after 10 aux steps: CUDA {on_gpu:.2e}, "
        f"CPU with 1e-6-perturbed weights {by_rounding:.2e}, CPU with another curvature seed {by_draws:.2e}"
    )
    # H200, session 4 (same draws on both devices): log s differed by 1.8e-4 (relative), i.e. ~4e-4 in Q. The GPU
    # now draws its own u and labels, so it may differ as another seed does; a device bug (wrong products) shows
    # as O(1)
    assert on_gpu <= max(1e-2, 10 * by_rounding, 3 * by_draws)


def classification_data(n=64, seq_len=8, seed=0) -> list[dict[str, torch.Tensor]]:
    """A plain list of examples (the GPU image has no `datasets`; the Trainer takes any sized dataset)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, seq_len), generator=g)
    labels = (ids[:, 0] > 32).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]} for i in range(n)]


GRADUAL = {
    "pruning": {
        "method": "fishleg",
        "init_sparsity": 0.3,
        "final_sparsity": 0.8,
        "start_step": 0,
        "end_step": 8,
        "update_frequency": 2,
        "obs_block_size": 8,
    },
    "curvature": {"damping": 1e-3, "num_batches": 2, "warmup_steps": 3, "refinement_steps": 2, "refine_every": 3},
}


def gpu_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


class Recorder(TrainerCallback):
    """Per optimizer step: whether the update changed the (untargeted) classifier bias, and the sparsity after it.

    Optionally blows up the logits (×1e6) in the forward pass of one step, so the fp16-scaled gradients
    overflow and the GradScaler must skip that step's update.
    """

    def __init__(self, model, recipe, overflow_step: int | None = None) -> None:
        self.recipe, self.overflow_step, self.step = load_recipe(recipe), overflow_step, 0
        self.updated: dict[int, bool] = {}
        self.sparsity: dict[int, float] = {}
        self.bias_before: torch.Tensor | None = None
        model.classifier.register_forward_hook(self._overflow)

    def _overflow(self, module, inputs, output):
        if module.training and self.step + 1 == self.overflow_step:
            return output * 1e6
        return output

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.bias_before = model.classifier.bias.detach().clone()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step
        self.updated[state.global_step] = not torch.equal(model.classifier.bias.detach(), self.bias_before)
        self.sparsity[state.global_step] = sparsity_report(model, self.recipe).global_sparsity


def finite_weights(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda_reaches_exact_target(tmp_path, precision):
    model = tiny_bert()
    recorder = Recorder(model, GRADUAL)
    trainer = FishLegPruningTrainer(
        model=model,
        args=gpu_args(tmp_path, **{precision: True}),
        recipe=GRADUAL,
        train_dataset=classification_data(),
        callbacks=[recorder],
    )
    trainer.train()
    report = sparsity_report(model, trainer.recipe)
    assert report.zeros == round(0.8 * report.numel)
    assert finite_weights(model)
    pruner = trainer.pruning_callback.pruner
    assert all(pruner.masks.keep(name).device.type == "cuda" for name in pruner.masks)
    curvature = [t for t in pruner.provider.state_dict()["tensors"].values() if t.is_floating_point()]
    assert curvature and all(t.device.type == "cuda" for t in curvature)
    logged = [h for h in trainer.state.log_history if "curvature_residual" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["curvature_residual"])) for h in logged)


def test_fp16_skipped_step_neither_prunes_nor_refines_and_target_follows(tmp_path):
    model = tiny_bert()
    recorder = Recorder(model, GRADUAL, overflow_step=4)  # step 4 is a pruning step (update_frequency 2)
    trainer = FishLegPruningTrainer(
        model=model,
        args=gpu_args(tmp_path, fp16=True),
        recipe=GRADUAL,
        train_dataset=classification_data(),
        callbacks=[recorder],
    )
    trainer.train()
    assert recorder.updated[3] and recorder.updated[5]
    assert not recorder.updated[4], "the overflowing step's update was not skipped by the GradScaler"
    assert recorder.sparsity[4] == pytest.approx(recorder.sparsity[3])  # no pruning on the skipped step
    assert recorder.sparsity[6] > recorder.sparsity[4]  # the schedule continues at step 6
    report = sparsity_report(model, trainer.recipe)
    assert report.zeros == round(0.8 * report.numel)
    assert finite_weights(model)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_cuda_checkpoint_resumes_with_same_masks_and_trajectory(tmp_path):
    def run(output, stop_at=None, resume=None):
        model = tiny_bert()
        recorder = Recorder(model, GRADUAL)
        callbacks = [recorder] + ([StopAt(stop_at)] if stop_at else [])
        trainer = FishLegPruningTrainer(
            model=model,
            recipe=GRADUAL,
            train_dataset=classification_data(),
            callbacks=callbacks,
            args=gpu_args(output, save_strategy="steps", save_steps=4),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, recorder.sparsity

    full, full_trace = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=6)  # "killed" after step 6; last checkpoint at step 4
    resumed, resumed_trace = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-4"))
    assert resumed_trace == {step: s for step, s in full_trace.items() if step > 4}
    # CUDA kernels (embedding backward) are not bitwise deterministic, so near-tied saliencies may flip
    full_w, resumed_w = targeted(full.model, GRADUAL), targeted(resumed.model, GRADUAL)
    mismatched = sum(int(((full_w[n] == 0) != (resumed_w[n] == 0)).sum()) for n in full_w)
    assert mismatched <= 0.01 * sum(w.numel() for w in full_w.values())


def test_compressed_checkpoint_of_cuda_model_loads_exactly(tmp_path):
    model = tiny_bert().to(CUDA)
    recipe = oneshot_recipe("fishleg-diagonal")
    oneshot(model, token_batches(n_batches=2), recipe)
    save_compressed(model, tmp_path, recipe)
    reloaded = load_compressed(type(model), tmp_path)
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name].cpu(), weight.cpu(), rtol=0, atol=0, msg=name)


def test_cg_rows_on_cuda_reach_the_same_update_as_on_cpu():
    """The cg solver's iteration (low-rank Woodbury preconditioner, compaction of converged rows) on the GPU: every
    row converges and its update's loss is within the solver's 1e-3 of the CPU result's."""
    import dataclasses

    from fls_hf.pruning.conjugate_gradient import cg_rows

    w, keep, model = wide_row_problem(rows=12)
    pruned_w = torch.where(keep, 0.0, w)
    coupling = (pruned_w @ model.a_bar()) * model.row_weight[:, None]
    rows = torch.arange(len(w))
    on_cpu, converged_cpu = cg_rows(coupling, model.a_bar(), model, rows, keep)
    gpu_model = dataclasses.replace(
        model, basis=model.basis.to(CUDA), eigenvalues=model.eigenvalues.to(CUDA), row_weight=model.row_weight.to(CUDA)
    )
    on_gpu, converged_gpu = cg_rows(coupling.to(CUDA), gpu_model.a_bar(), gpu_model, rows.to(CUDA), keep.to(CUDA))
    assert converged_cpu.all() and converged_gpu.all() and on_gpu.is_cuda
    assert torch.all(on_gpu.cpu()[~keep] == 0)
    torch.testing.assert_close(
        row_losses(on_gpu.cpu() - pruned_w, model), row_losses(on_cpu - pruned_w, model), rtol=1e-3, atol=0
    )

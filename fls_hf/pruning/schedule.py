"""When to prune and how far: one-shot and gradual (cubic / linear) sparsity schedules.

Steps are optimizer steps (never micro-batches), so gradient accumulation cannot skew the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import RecipeError


@dataclass(frozen=True)
class SparsitySchedule:
    """Target sparsity as a function of the optimizer step (values as the recipe validated them).

    Before `start_step` nothing is pruned; at `start_step` the target is `init_sparsity`; it then
    rises to `final_sparsity`, reached at `end_step` and held afterwards. Cubic is Zhu & Gupta
    (2017), "To prune, or not to prune", arXiv:1710.01878:

        s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (t1 − t0))³,   t0 = start_step, t1 = end_step

    which prunes fast while many redundant weights remain and slowly near the end. Linear replaces
    the cube by the first power. One-shot: `start_step == end_step` (target `final_sparsity`).

    Args:
        init_sparsity: target at `start_step`, in [0, 1).
        final_sparsity: target from `end_step` on, in [init_sparsity, 1).
        start_step: first pruning step (optimizer steps, >= 0).
        end_step: last pruning step (>= start_step).
        update_frequency: optimizer steps between pruning steps (>= 1); `end_step` always prunes.
        inter_func: "cubic" or "linear".
    """

    init_sparsity: float
    final_sparsity: float
    start_step: int
    end_step: int
    update_frequency: int = 1
    inter_func: str = "cubic"

    def target(self, step: int) -> float:
        """Sparsity the model should have after pruning at optimizer step `step` (0.0 before start)."""
        if step < self.start_step:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        remaining = 1.0 - (step - self.start_step) / (self.end_step - self.start_step)
        power = 3 if self.inter_func == "cubic" else 1
        return self.final_sparsity + (self.init_sparsity - self.final_sparsity) * remaining**power

    def is_pruning_step(self, step: int) -> bool:
        """True at `start_step`, every `update_frequency` steps after it, and at `end_step`."""
        if not self.start_step <= step <= self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.update_frequency == 0

    def pruning_steps(self) -> list[int]:
        """Every step at which `is_pruning_step` holds, ascending."""
        steps = list(range(self.start_step, self.end_step + 1, self.update_frequency))
        if steps[-1] != self.end_step:
            steps.append(self.end_step)
        return steps


def recomputation_targets(current: float, target: float, k: int) -> list[float]:
    """Split one jump current → target into `k` sub-targets with curvature recomputed in between.

    Steps are equal in log-density (as in oBERT / WoodFisher): density d_i = d0 · (d_t / d0)^(i/k),
    d = 1 − sparsity, i = 1..k; the last one is exactly `target`. Each sub-step removes the same
    fraction of the weights still alive, so fewer weights per sub-step as the model gets sparser.
    """
    for what, value in (("current sparsity", current), ("target sparsity", target)):
        if not 0.0 <= value < 1.0:
            raise RecipeError(f"{what} = {value!r} must be in [0, 1)")
    if current > target:
        raise RecipeError(
            f"target sparsity {target!r} is below the current sparsity {current!r}; pruned weights never regrow"
        )
    d0, dt = 1.0 - current, 1.0 - target
    steps = [1.0 - d0 * math.exp(math.log(dt / d0) * i / k) for i in range(1, k)]
    return [min(max(s, current), target) for s in steps] + [target]

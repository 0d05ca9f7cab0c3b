"""Issue 18, scale: peak memory and time of one-shot pruning of a Llama-shaped model, per method.

A random-init `LlamaForCausalLM` of a chosen shape (built from a config: no Hub access, fp32) is pruned one-shot to
50 % unstructured with one global threshold over every q/k/v/o/gate/up/down projection of its decoder layers
(`TARGETS`; embeddings and lm_head are never pruned), on synthetic calibration data: `--batches` batches of
`--batch_size` sequences of `--seq_len` random token ids (`labels` = input_ids, attention_mask all ones; the
statistics use labels sampled from the model, so the ids' randomness does not matter for cost). Methods
(`--methods`, comma-separated):

- `magnitude`: `pruning.method: magnitude`, `compensation: none`;
- `fls-diagonal`: `pruning.method: fishleg`, `curvature.structure: diagonal`, `init: kfac`, `warmup_steps: 0`,
  `refinement_steps: 0` (FLS with a diagonal Q taken from K-FAC, no aux steps), `compensation: none`;
- `kfac-obc`: the package default, `pruning.method: kfac`, `compensation: obc` (1 round, relative damping 1e-2).

Every method sees the calibration set exactly once: `curvature.init_examples` / `num_examples` = batches ×
batch_size and `num_batches` = batches (the package defaults, 256 examples / 16 batches, would cycle 8 batches).

Each method runs in a fresh subprocess (`python -m benchmarks.scale --child METHOD ...`), so its peak is its own. The
child builds the model (seed `--seed`) and the batches, runs one forward + backward on the first batch (untimed
warm-up first on CUDA; timed: the training-step reference), frees the gradients, then measures the whole
`oneshot(model, batches, recipe)` call:

- memory on CPU: the resident set. Its high-water mark (VmHWM, which also backs ru_maxrss) is reset through
  `/proc/self/clear_refs` just before `oneshot`, so peak growth = peak RSS during `oneshot` − RSS at its start
  (model, batches and whatever the allocator kept from the forward + backward). Also recorded: growth over the
  high-water mark of build + forward + backward (ru_maxrss before vs after; smaller, since a forward's transient
  peak already counts there). Where clear_refs is not writable, only the latter is available and is used
  (`memory_probe` in each row says which). The RSS is glibc's view: freed blocks below its (dynamic, up to 32 MiB)
  mmap threshold stay in the heap, so the RSS at the start already holds memory the forward + backward freed and
  `oneshot` reuses, and it does not come down after a phase. `MALLOC_MMAP_THRESHOLD_=131072` in the environment
  (inherited by the children, recorded in the settings) returns every block of 128 KiB or more to the system
  on free: growth then follows the live tensors (measured on `small` before the per-layer selection of session 8:
  magnitude's peak growth 13.9 B per targeted weight by default, 16.0 with it; after it, 5.3 with it). On CUDA:
  `torch.cuda.max_memory_allocated` − `memory_allocated` at the start,
  peak stats reset just before `oneshot`.
- bytes of growth per targeted weight (sharded: per weight the rank holds); the model's bytes (parameters +
  buffers); peak − model.
- wall and CPU seconds (`time.process_time`, all threads) of the whole `oneshot` call.
- per phase (cheap: fls_hf functions wrapped in the child by name, fls_hf code unchanged; nested phases count
  only their own time, and each phase's peak is the highest memory reached inside it): `setup` (Pruner: targets,
  masks, curvature state), `statistics` (`kronecker_statistics`: the K-FAC forward + backward passes),
  `curvature` (the rest of the curvature's `ready`: eigendecompositions, Q from K-FAC), `selection`
  (`select_pruned`: the global threshold), `saliency+update` (the rest of `prune_step`: saliencies, compensation /
  OBC sweep, weight and mask writes), `finish` (mask digest, sparsity report). On CUDA every phase boundary
  synchronises (a few per call).
- the measured sparsity over the targeted weights: exact zeros / targeted, which must be exactly
  round(0.5 · targeted) / targeted.

Shapes (`--shape`; each child prints its counts):

- `quick`: hidden 64, 2 layers, intermediate 172, 4 / 2 heads, vocabulary 256 (CI; calibration 2 × 2 × 32).
- `small`: hidden 512, 8 layers, intermediate 1408, 8 heads, vocabulary 32,000: 58.5 M parameters, 25.7 M targeted.
- `llama-250m`: hidden 1024, 16 layers, intermediate 2816, 16 heads, vocabulary 32,000, untied lm_head (Llama's
  default): 271 M parameters, 205.5 M targeted.
- `tinyllama-1.1b`: TinyLlama-1.1B's shape, 22 layers, hidden 2048, intermediate 5632, 32 / 4 heads (GQA),
  vocabulary 32,000: 1.1 B parameters, 969 M targeted.

Calibration defaults 8 batches × 4 sequences × 512 tokens (the issue's), `--quick`: 2 × 2 × 32.

`--world_size N` (issue 19): each child runs as N CPU processes (torchrun, gloo) holding the model sharded with FSDP2
(`fully_shard` on every decoder layer and the root, weights sharded by rows), every rank on the same calibration
batches; one row per rank, with its own peak growth and `curvature_bytes` / `mask_bytes` (the pruner's curvature
state and masks on that rank). Methods: magnitude and kfac-obc (fls-diagonal needs whole weights: refused).

    python -m benchmarks.scale --quick                                   # CI smoke run, seconds
    python -m benchmarks.scale --shape small --methods magnitude,fls-diagonal --batches 2 --seq_len 128 --threads 1
    python -m benchmarks.scale --shape llama-250m                        # issue 18's CPU acceptance (2 threads)
    python -m benchmarks.scale --shape tinyllama-1.1b --device cuda --threads 8 --timeout 300   # one H200, < 8 min
    python -m benchmarks.scale --shape small --methods magnitude,kfac-obc --world_size 2 --threads 1   # FSDP2, 2 ranks

The issue's acceptance: on CPU, peak RSS growth ≤ 12 bytes per targeted weight for magnitude and ≤ 24 for
fls-diagonal, exact sparsity; on the GPU (TinyLlama shape), peak ≤ model + 2 GiB for magnitude and ≤ model + 6 GiB
for fls-diagonal. The table's last column checks these. On CPU, kfac-obc on llama-250m is expected to take tens of
minutes (K-FAC statistics over 16 k tokens plus an fp64 Cholesky per row in the OBC sweep). `--timeout` (seconds
per method) ends a child that runs too long: its row then records the timeout (on the GPU command it keeps the
whole run inside its slot even if the OBC sweep on 1.1 B weights is slow; a method that fails or is killed, e.g.
for memory, records its exit status the same way).

Output: benchmarks/results/scale_<shape>_<device>.json (settings, one row per method) and a Markdown table on
stdout. Torch threads: `--threads` (default 2; 1 with `--quick`), also OMP_NUM_THREADS of the children.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .common import children
from .common.paths import REPO, RESULTS
from .common.rows import finish_report

# torch, transformers and fls_hf are imported inside the functions that run in the children: the parent only
# launches them and writes the table, and skipping those imports there saves seconds on every (CI) run

TARGETS = [r"re:.*layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$"]
SPARSITY = 0.5
SHAPES = {
    "quick": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 172,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    },
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "intermediate_size": 1408,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    },
    "llama-250m": {
        "hidden_size": 1024,
        "num_hidden_layers": 16,
        "intermediate_size": 2816,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
    },
    "tinyllama-1.1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 22,
        "intermediate_size": 5632,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
CALIBRATION = {"batches": 8, "batch_size": 4, "seq_len": 512}
QUICK = {"batches": 2, "batch_size": 2, "seq_len": 32, "threads": 1}
METHODS = ("magnitude", "fls-diagonal", "kfac-obc")
# issue 18's acceptance: CPU bytes of RSS growth per targeted weight; GPU GiB above the model's bytes
CPU_LIMITS = {"magnitude": 12, "fls-diagonal": 24}
GPU_LIMITS_GIB = {"magnitude": 2, "fls-diagonal": 6}
GIB = 2**30
MODEL_KEYS = (
    "parameters",
    "targeted_weights",
    "targeted_layers",
    "model_bytes",
    "device_name",
    "torch",
    "transformers",
)


# ----------------------------------------------------------------------------- model, data, recipes
def llama_config(shape: str, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max(2048, seq_len),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def targeted(model) -> dict:
    """The pruned projections (name → torch.nn.Linear), by the regex the recipe is given."""
    import torch

    pattern = re.compile(TARGETS[0].removeprefix("re:"))
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)}


def counts(model) -> dict[str, int]:
    """Parameters, targeted weights and the model's bytes (parameters + buffers)."""
    tensors = [*model.parameters(), *model.buffers()]
    layers = targeted(model)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "targeted_weights": sum(m.weight.numel() for m in layers.values()),
        "targeted_layers": len(layers),
        "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
    }


def calibration(vocab_size: int, args, device) -> list[dict]:
    """`args.batches` batches of random token ids (seeded), labels = input_ids, attention_mask ones."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(args.batches):
        ids = torch.randint(3, vocab_size, (args.batch_size, args.seq_len), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def recipe(method: str, batches: int, examples: int) -> dict:
    """The recipe of each method; every curvature sees the calibration set once (`examples` = batches × size)."""
    pruning = {"final_sparsity": SPARSITY, "targets": TARGETS, "global_sparsity": True}
    if method == "magnitude":
        return {"pruning": {**pruning, "method": "magnitude", "compensation": "none"}, "curvature": {}}
    if method == "fls-diagonal":
        curvature = {
            "structure": "diagonal",
            "init": "kfac",
            "warmup_steps": 0,
            "refinement_steps": 0,
            "init_examples": examples,
            "num_batches": batches,
        }
        return {"pruning": {**pruning, "method": "fishleg", "compensation": "none"}, "curvature": curvature}
    if method == "kfac-obc":
        curvature = {"num_examples": examples, "num_batches": batches}
        return {"pruning": {**pruning, "method": "kfac", "compensation": "obc"}, "curvature": curvature}
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- memory and time per phase
def _status_bytes(field: str) -> int:
    """A `VmXXX:` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM, ru_maxrss); False where the kernel does not let us."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Meter:
    """Wall time and peak memory of one call and of the phases inside it (nested phases count their own time).

    CPU: resident set (VmRSS / VmHWM, the high-water mark reset at every phase boundary); CUDA: allocated bytes
    (`max_memory_allocated`, peak stats reset at every boundary, after a synchronise)."""

    def __init__(self, device, progress: Path | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda
        self.phases: dict[str, dict[str, float]] = {}
        self.stack: list[str] = []
        self.progress = progress  # rewritten at every phase boundary: what a timed-out or killed run got through

    @property
    def probe(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated - memory_allocated at the start"
        if self.resettable:
            return "peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS at the start"
        return "ru_maxrss after - ru_maxrss before (clear_refs not writable: growth over the build+forward peak)"

    def current(self) -> int:
        import torch

        return torch.cuda.memory_allocated(self.device) if self.cuda else _status_bytes("VmRSS")

    def _peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM") if self.resettable else _maxrss_bytes()

    def _reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _reset_rss_peak()

    def start(self) -> None:
        import torch

        self.prior_peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else _maxrss_bytes()
        self.resettable = self.cuda or _reset_rss_peak()  # read the earlier high-water mark before resetting it
        self._reset()
        self.base = self.current()
        # without a resettable peak, growth can only be read against the earlier high-water mark
        self.reference = self.base if self.resettable else self.prior_peak
        self.peak = self.base
        self.stack = ["setup"]
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.mark = self.wall
        self._report()

    def _close_segment(self) -> None:
        peak = self._peak()
        now = time.perf_counter()
        entry = self.phases.setdefault(self.stack[-1], {"seconds": 0.0, "peak_growth_bytes": 0})
        entry["seconds"] += now - self.mark
        entry["peak_growth_bytes"] = max(entry["peak_growth_bytes"], peak - self.reference, 0)
        self.peak = max(self.peak, peak)
        self._reset()
        self.mark = time.perf_counter()

    def _report(self) -> None:
        """The phases so far and the one now running, for a run that is ended before it finishes."""
        if self.progress is not None:
            so_far = {"in_phase": self.stack[-1], "seconds": time.perf_counter() - self.wall, "phases": self.phases}
            so_far["peak_growth_bytes"] = max(self.peak - self.reference, 0)
            self.progress.write_text(json.dumps(so_far, indent=1) + "\n")

    @contextmanager
    def phase(self, label: str):
        self._close_segment()
        self.stack.append(label)
        self._report()
        try:
            yield
        finally:
            self._close_segment()
            self.stack.pop()
            if len(self.stack) == 1:
                self.stack[0] = "finish"
            self._report()

    def stop(self) -> dict:
        self._close_segment()
        return {
            "wall_seconds": time.perf_counter() - self.wall,
            "cpu_seconds": time.process_time() - self.cpu,
            "memory_at_start_bytes": self.base,
            "prior_peak_bytes": self.prior_peak,
            "peak_bytes": self.peak,
            "peak_growth_bytes": max(self.peak - self.reference, 0),
            "growth_over_prior_peak_bytes": max(self.peak - self.prior_peak, 0),
            "memory_probe": self.probe,
            "phases": self.phases,
        }


def instrument(meter: Meter) -> None:
    """Wrap fls_hf's phase functions by name (this child process only) so `meter` sees their boundaries."""
    from fls_hf.curvature import kfac
    from fls_hf.curvature.fishleg import warm_start
    from fls_hf.pruning import pruner, surgeon

    def wrapped(function, label):
        def call(*args, **kwargs):
            with meter.phase(label):
                return function(*args, **kwargs)

        return call

    pruner.Pruner._ready_curvature = wrapped(pruner.Pruner._ready_curvature, "curvature")
    pruner.prune_step = wrapped(pruner.prune_step, "saliency+update")
    surgeon.select_pruned = wrapped(surgeon.select_pruned, "selection")
    kfac.kronecker_statistics = wrapped(kfac.kronecker_statistics, "statistics")
    warm_start.kronecker_statistics = wrapped(warm_start.kronecker_statistics, "statistics")


# ----------------------------------------------------------------------------- one method (child process)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(model, batch: dict, device) -> float:
    """Seconds of one forward + backward on `batch` (a warm-up first on CUDA); gradients freed afterwards."""
    for _ in range(2 if device.type == "cuda" else 1):
        synchronize(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        synchronize(device)
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
    return seconds


def run_method(method: str, args) -> dict:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from fls_hf import load_recipe, oneshot, sparsity_report

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    mesh = sharding_mesh(args)
    config = llama_config(args.shape, args.seq_len)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with device:
        model = LlamaForCausalLM(config)
    model.eval()
    build_seconds = time.perf_counter() - start
    sizes = counts(model)
    if mesh is not None:
        shard(model, mesh)
    print(
        f"{method}: {args.shape}, {sizes['parameters'] / 1e6:.1f} M parameters, "
        f"{sizes['targeted_weights'] / 1e6:.1f} M targeted in {sizes['targeted_layers']} projections, model "
        f"{sizes['model_bytes'] / GIB:.2f} GiB, built in {build_seconds:.1f} s",
        flush=True,
    )
    batches = calibration(config.vocab_size, args, device)
    train_seconds = forward_backward(model, batches[0], device)
    gc.collect()
    layers = targeted(model)
    total = sizes["targeted_weights"]
    cfg = recipe(method, args.batches, args.batches * args.batch_size)
    rank = 0 if mesh is None else mesh.get_rank()
    meter = Meter(device, progress=partial_file(output_file(args, rank)) if args.child_output else None)
    instrument(meter)
    meter.start()
    with kept_pruner() as pruners:
        oneshot(model, batches, cfg)
    measured = meter.stop()
    zeros = sparsity_report(model, load_recipe(cfg)).zeros  # summed over the ranks when sharded
    row = {
        "method": method,
        "world_size": args.world_size,
        "rank": rank,
        "curvature_bytes": pruners[0].provider.memory_bytes(),
        "mask_bytes": sum(pruners[0].masks.keep(n).numel() for n in pruners[0].masks),
        "recipe": cfg,
        **sizes,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "build_seconds": build_seconds,
        "forward_backward_seconds": train_seconds,
        "zeros": zeros,
        "expected_zeros": round(SPARSITY * total),
        "sparsity": zeros / total,
        **measured,
    }
    local = sum(held(m.weight) for m in layers.values())  # this rank's targeted weights (sharded: its rows)
    row["local_targeted_weights"] = local
    row["peak_growth_bytes_per_weight"] = row["peak_growth_bytes"] / local
    row["growth_over_prior_peak_bytes_per_weight"] = row["growth_over_prior_peak_bytes"] / local
    statistics = measured["phases"].get("statistics")
    if statistics:  # each example's statistics pass against one training forward + backward per example
        examples = args.batches * args.batch_size
        row["statistics_examples_per_second"] = examples / statistics["seconds"]
        row["train_examples_per_second"] = args.batch_size / train_seconds
    return row


def sharding_mesh(args):
    """A 1-D CPU mesh over the torchrun processes with `--world_size` > 1; None otherwise."""
    if args.world_size == 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    return init_device_mesh("cpu", (args.world_size,))


def close_process_group() -> None:
    """Destroy the gloo group before the interpreter exits: left to interpreter teardown, its worker threads can
    abort the process (SIGABRT, "terminate called without an active exception"), failing a run that finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(model, mesh) -> None:
    """FSDP2 as users apply it to a Llama: every decoder layer, then the root (weights sharded by rows)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextmanager
def kept_pruner():
    """The Pruner that `oneshot` builds, kept for its state's bytes (its __init__ wrapped, as `instrument` does)."""
    from fls_hf.pruning import pruner

    made, original = [], pruner.Pruner.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    pruner.Pruner.__init__ = init
    try:
        yield made
    finally:
        pruner.Pruner.__init__ = original


def held(weight) -> int:
    """Elements of `weight` this process holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    return (weight.to_local() if isinstance(weight, DTensor) else weight).numel()


# ----------------------------------------------------------------------------- parent: every method
def child_command(method: str, args, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "benchmarks.scale"]
    if args.world_size > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        launcher += [str(args.world_size), "-m", "benchmarks.scale"]
    command = [*launcher, "--child", method, "--child_output", str(out)]
    for key in ("shape", "batches", "batch_size", "seq_len", "device", "threads", "seed", "world_size"):
        command += [f"--{key}", str(getattr(args, key))]
    return command


def run_child(method: str, args) -> list[dict]:
    """One method in a fresh interpreter (one per rank); rows, or one with `error` when it fails, is killed or runs
    past `--timeout`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        outs = [out] if args.world_size == 1 else [child_file(out, r) for r in range(args.world_size)]
        done = children.run_child(child_command(method, args, out), cwd=REPO, env=env, timeout=args.timeout)
        if done.ok and all(o.is_file() for o in outs):
            return [json.loads(o.read_text()) for o in outs]
        return [failed_row(method, done.describe(), partial_file(outs[0]), stderr_tail=done.tail)]


def failed_row(method: str, error: str, partial: Path, stderr_tail: str = "") -> dict:
    """A failed child's row: its error and the end of its stderr, and the oneshot phases it finished (rank 0's),
    with their times and peaks, where it wrote them whole."""
    row = {"method": method, "error": error} | ({"stderr_tail": stderr_tail} if stderr_tail else {})
    try:
        row["partial"] = json.loads(partial.read_text())
    except (OSError, ValueError):  # none written, or cut off mid-write: the error alone
        return row
    row["error"] += f", in oneshot phase {row['partial']['in_phase']}"
    return row


def child_file(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def output_file(args, rank: int) -> Path:
    """Where a child (one rank of it) writes its row."""
    out = Path(args.child_output)
    return out if args.world_size == 1 else child_file(out, rank)


def partial_file(out: Path) -> Path:
    """The phases a child got through, rewritten at every boundary (one file per rank: ranks never share one)."""
    return Path(str(out) + ".partial")


def bound(row: dict, device: str) -> str:
    """Issue 18's acceptance for this row: `yes` / `no` with its limit, `–` where the issue sets none."""
    if device == "cuda":
        limit = GPU_LIMITS_GIB.get(row["method"])
        if limit is None:
            return "–"
        ok = row["peak_bytes"] - row["model_bytes"] <= limit * GIB
        return f"{'yes' if ok else 'no'} (≤ model + {limit} GiB)"
    limit = CPU_LIMITS.get(row["method"])
    if limit is None:
        return "–"
    return f"{'yes' if row['peak_growth_bytes_per_weight'] <= limit else 'no'} (≤ {limit} B)"


PHASE_COLUMNS = ("statistics", "curvature", "selection", "saliency+update")


def markdown(report: dict) -> str:
    settings = report["settings"]
    unit = "GPU allocated" if settings["device"] == "cuda" else "RSS"
    lines = [
        f"| method | peak {unit} growth | B / targeted weight | over prior peak, B / w | peak − model | curvature "
        "| oneshot s | CPU s | statistics s | curvature s | selection s | saliency+update s | zeros = 50 % "
        "| issue 18 bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['error']} |" + " |" * 12)
            continue
        phases = row["phases"]
        times = [f"{phases[p]['seconds']:.1f}" if p in phases else "–" for p in PHASE_COLUMNS]
        cells = [
            row["method"] + (f" (rank {row['rank']} of {row['world_size']})" if row.get("world_size", 1) > 1 else ""),
            f"{row['peak_growth_bytes'] / GIB:.2f} GiB",
            f"{row['peak_growth_bytes_per_weight']:.2f}",
            f"{row['growth_over_prior_peak_bytes_per_weight']:.2f}",
            f"{(row['peak_bytes'] - row['model_bytes']) / GIB:.2f} GiB",
            f"{row['curvature_bytes'] / GIB:.3f} GiB" if "curvature_bytes" in row else "–",
            f"{row['wall_seconds']:.1f}",
            f"{row['cpu_seconds']:.1f}",
            *times,
            "yes" if row["zeros"] == row["expected_zeros"] else f"no ({100 * row['sparsity']:.4f} %)",
            bound(row, settings["device"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-250m", choices=tuple(SHAPES))
    parser.add_argument("--quick", action="store_true", help="CI smoke run: --shape quick, calibration 2 × 2 × 32")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument(
        "--batches", type=int, default=None, help=f"calibration batches (default {CALIBRATION['batches']})"
    )
    parser.add_argument("--batch_size", type=int, default=None, help=f"default {CALIBRATION['batch_size']}")
    parser.add_argument("--seq_len", type=int, default=None, help=f"default {CALIBRATION['seq_len']}")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each child (default 2; quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per method before its child is ended")
    parser.add_argument("--world_size", type=int, default=1, help="CPU processes holding the model sharded (FSDP2)")
    parser.add_argument("--output", default=None, help="default benchmarks/results/scale_<shape>_<device>.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape = "quick"
    defaults = {**CALIBRATION, "threads": 2}
    if args.shape == "quick":
        defaults.update(QUICK)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    args.methods = methods
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        try:
            row = run_method(args.child, args)
            output_file(args, row["rank"]).write_text(json.dumps(row, indent=1) + "\n")
        finally:
            close_process_group()
        if args.world_size > 1:  # the row is written: skip the interpreter's teardown, where gloo's threads have
            sys.stdout.flush()  # still aborted a finished rank now and then (SIGABRT; CI, 2026-12-02)
            sys.stderr.flush()
            os._exit(0)
        return
    device = args.device.partition(":")[0]
    settings = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "dtype": "float32",
        "targets": TARGETS,
        "sparsity": SPARSITY,
        "global_sparsity": True,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "calibration_tokens": args.batches * args.batch_size * args.seq_len,
        "device": device,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "world_size": args.world_size,
        "seed": args.seed,
        "timeout": args.timeout,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(
        f"{args.shape} on {device}: calibration {args.batches} × {args.batch_size} × {args.seq_len} tokens, "
        f"{args.threads} threads, methods {', '.join(args.methods)} (each in a fresh process)",
        flush=True,
    )
    sharded = "" if args.world_size == 1 else f"_fsdp{args.world_size}"
    out = Path(args.output) if args.output else RESULTS / f"scale_{args.shape}_{device}{sharded}.json"
    report = {"settings": settings, "rows": []}
    for method in args.methods:
        rows = run_child(method, args)
        report["rows"].extend(rows)
        row = rows[0]
        if "error" not in row and "parameters" not in settings:  # sizes and versions, as the children saw them
            settings.update({key: row[key] for key in MODEL_KEYS})
        out.write_text(json.dumps(report, indent=1) + "\n")
        if "error" in row:
            print(f"{method}: {row['error']}", flush=True)
        else:
            print(
                f"{method}: peak growth {row['peak_growth_bytes'] / GIB:.3f} GiB = "
                f"{row['peak_growth_bytes_per_weight']:.2f} B / targeted weight, oneshot {row['wall_seconds']:.1f} s "
                f"wall, {row['cpu_seconds']:.1f} s CPU, zeros {row['zeros']} of {row['targeted_weights']}",
                flush=True,
            )
    finish_report(report, out, markdown(report))


if __name__ == "__main__":
    main()

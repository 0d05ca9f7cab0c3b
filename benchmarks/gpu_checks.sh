#!/bin/bash
# Issue 18's GPU rows in one run of under 8 minutes (the device tool's budget): the CUDA tests, then the TinyLlama
# one-shot memory / time rows and the BERT-base gradual cost rows; issue 20's shrunk-model latency rows; issue 19's
# FishLegPruningTrainer under FSDP2 (torchrun, one GPU: accelerate shards; FLS_HF_TRAINER_FSDP=1 until it passes). From the repository root on the GPU machine:
#     OUT=/some/folder bash benchmarks/gpu_checks.sh
# Results land in $OUT (JSON + logs); copy them to benchmarks/results/ and into benchmarks/README.md.
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 FLS_HF_DISABLE_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt" 2>&1
timeout 130 python -m pytest -q -x tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1; echo "test_cuda rc $?" >> "$OUT/gpu.txt"
timeout 130 python -m benchmarks.scale --shape tinyllama-1.1b --device cuda --threads 8 --timeout 50 \
    --methods magnitude,fls-diagonal,kfac-obc --output "$OUT/scale_tinyllama-1.1b_cuda.json" > "$OUT/scale.log" 2>&1
echo "scale rc $?" >> "$OUT/gpu.txt"
timeout 120 python -m benchmarks.gradual_cost --shape bert-base --device cuda --bf16 \
    --runs fine-tune,magnitude,shipped-90,shipped-90-exact,shipped-90-pass \
    --output "$OUT/gradual_cost_bert-base_cuda.json" > "$OUT/gradual_cost.log" 2>&1
echo "gradual_cost rc $?" >> "$OUT/gpu.txt"
timeout 30 python -m benchmarks.structured_latency --device cuda --dtype bfloat16 --repeats 20 \
    --output "$OUT/structured_latency_cuda.json" > "$OUT/structured_latency.log" 2>&1
echo "structured_latency rc $?" >> "$OUT/gpu.txt"
timeout 80 torchrun --standalone --nproc_per_node 1 tests/scripts/trainer_fsdp.py "$OUT/trainer_fsdp" \
    > "$OUT/trainer_fsdp.log" 2>&1
echo "trainer_fsdp rc $?" >> "$OUT/gpu.txt"
cat "$OUT/trainer_fsdp/trainer_fsdp.json" >> "$OUT/gpu.txt" 2>/dev/null
cat "$OUT/gpu.txt"

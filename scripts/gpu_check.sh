#!/usr/bin/env bash
# The edge on a GPU in one run of at most 8 minutes (covspec/tools/gpu_check.py): a random
# Qwen2.5-VL-7B-text-shaped target in bf16 on CUDA, verify ms per window 1..16 for 1 and 8 batched
# sessions (DynamicCache paths, static bucketed eager, CUDA graphs, torch.compile reduce-overhead),
# target-only decode tokens/s, the demo pair's fp32 vs bf16 answers, the demo pair end to end with the
# edge in process (default and static + CUDA graphs, loopback) and with `covspec bench` (the edge on
# the GPU, covspec vs target_only over loopback and wifi). Results in results/gpu/.
#   scripts/gpu_check.sh              on a GPU machine
#   scripts/gpu_check.sh --cpu-smoke  the same steps, shrunk, on a CPU (a check of the script)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
out=results/gpu
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && out=runs/gpu-smoke; done  # a check of the script, not figures
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.txt" 2>&1 || true
# 480 s: a hard stop past the script's own budget (450 s, which it keeps by skipping what does not fit)
timeout 480 python -m covspec.tools.gpu_check --out "$out" "$@" 2>&1 | tee "$out/log.txt"

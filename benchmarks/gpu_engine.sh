#!/usr/bin/env bash
# Rollout engine speed on a CUDA machine: the WHAM 200M transformer over the 540-token ViT
# layout (preset wham-200m-540) with random weights in bfloat16, full-mode rollouts at batch 1,
# 8 and 32 (the auto decode path, flash-attn when installed, then the compiled CUDA-graph
# static decode while time allows), then both decodings (sequential and diagonal, one
# anti-diagonal of the 18 x 30 token grid a pass) at batch 1, 8 and 32. Prints TWO JSON lines:
# device, read bandwidth, and per run the decode path, tokens/s, frames/s, prefill seconds and
# decode ms/token; then frames/s and forward passes a frame of each decoding.
# Bounded to under seven minutes. Without CUDA it runs tiny CPU smoke measurements instead.
#
#   bash benchmarks/gpu_engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    PYTHON=python3
fi
timeout 270 "$PYTHON" benchmarks/bench_engine.py --gpu "$@"
exec timeout 150 "$PYTHON" benchmarks/bench_engine.py --gpu --decoding both

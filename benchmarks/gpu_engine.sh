#!/usr/bin/env bash
# Rollout engine speed on a CUDA machine: the WHAM 200M transformer shape with random weights
# in bfloat16, full-mode rollouts at batch 1, 8 and 32 (eager decode, then the compiled CUDA
# graph decode while time allows). Prints ONE JSON line: device, copy bandwidth, and per run
# tokens/s, frames/s, prefill seconds, decode ms/token and its share of the copy bandwidth.
# Bounded to under five minutes. Without CUDA it runs a tiny CPU smoke measurement instead.
#
#   bash benchmarks/gpu_engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    PYTHON=python3
fi
exec timeout 290 "$PYTHON" benchmarks/bench_engine.py --gpu "$@"

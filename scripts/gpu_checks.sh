#!/usr/bin/env bash
# The checks BENCHMARKS.md lists under "Not measured on a GPU yet", in one go, on a CUDA machine with its own
# PyTorch, Triton, transformers and pytest (no package index needed: moekit is installed editable, without
# dependencies). Each step has its own time limit, so one that hangs cannot take the others' time.
#
#   bash scripts/gpu_checks.sh [OUT]        # OUT (default runs/gpu): device.txt, log.txt and the benchmarks' JSON
#   PYTHON=/path/to/python bash scripts/gpu_checks.sh
#
# Two GPUs or more add the NCCL runs (tests/test_moe_train_parallel_gpu.py) and scripts/bench_parallel.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')" \
    || exit 2
if ! "$PY" -c "import moekit.llama" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --disable-pip-version-check -e . >> "$LOG" 2>&1 \
        || { echo "could not install moekit (see $LOG)"; exit 2; }
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import sys, torch, triton, transformers; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, \
triton {triton.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}, {torch.cuda.device_count()} GPU(s)')"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

step() {  # step NAME SECONDS COMMAND...: run it, its output to log.txt, one line of result here
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "===== $name: $*" >> "$LOG"
    PYTHONUNBUFFERED=1 timeout "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    printf '%-14s exit %3d  %4d s\n' "$name" "$rc" $((SECONDS - start))
}

step tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_kernels_triton_gpu.py tests/test_moe_layer_gpu.py
step bench-gemm 120 "$PY" -m moekit bench gemm --iters 5 --json "$OUT/gemm_gpu.json" --force
step bench-layer 120 "$PY" -m moekit bench layer --preset mixtral --device cuda --json "$OUT/layer_gpu.json" --force
step bench-train 90 "$PY" -m moekit bench train --preset 1b --json "$OUT/train_gpu.json" --force
if [ "$GPUS" -ge 2 ]; then
    step tests-nccl 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_moe_train_parallel_gpu.py
    step bench-parallel 300 "$PY" scripts/bench_parallel.py --json "$OUT/parallel_gpu.json"
else
    echo "one GPU: the NCCL runs (tests/test_moe_train_parallel_gpu.py, scripts/bench_parallel.py) need two" | tee -a "$LOG"
fi
grep -E "passed|failed|skipped|error" "$LOG" | tail -5

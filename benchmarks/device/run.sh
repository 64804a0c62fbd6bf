#!/usr/bin/env bash
# There, on the GPU machine (JAX, no TensorFlow, no internet), from the repository root: installs
# the wheels of .whl/ (benchmarks/device/fetch_wheels.sh) into /tmp/site, then runs bench_gpu.py
# under KERAS_BACKEND=jax with sat_tf from this checkout. Results and the log go to $OUT.
# Extra arguments go to bench_gpu.py (e.g. --tiny for a CPU smoke run).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench_gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1
"$PYTHON" benchmarks/device/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log"

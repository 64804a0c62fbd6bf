#!/usr/bin/env bash
# Here, before a device run: downloads into .whl/ (git-ignored, at the repository root) the wheels
# that benchmarks/device/run.sh installs on the GPU machine, which has JAX, NumPy, h5py, ml-dtypes,
# absl-py, rich and packaging but not Keras or Keras's two other needs, namex and optree.
# Python 3.12, x86-64 manylinux: the GPU machine's python3. PYTHON picks the pip (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0
ls -l .whl

#!/usr/bin/env bash
# Downloads, on a machine with the package registry, the wheels that bench/gpu_check.sh unpacks on the GPU
# machine, whose software is fixed and offline (Python 3.12, torch, triton, numpy, matplotlib, pytest and
# scikit-learn there; timm of unknown version): timm at the version this project is tested with. They go
# to bench/wheels/ (git-ignored, 2.8 MB); carry that folder with the checkout (`carry: ["bench/wheels"]`).
# WHEELS=... names other requirements (space-separated pip specifiers, each a pure-Python wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=${WHEELS:-timm==1.0.31}
rm -rf bench/wheels
mkdir -p bench/wheels
# shellcheck disable=SC2086 - WHEELS is a word list
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d bench/wheels $wheels
ls -l bench/wheels

#!/usr/bin/env bash
# One GPU validation run (aim: under 8 minutes on an H100): the GPU tests of the fused ops, then the `full`
# benchmark suite (`mxa bench --suite full`) with its table, records, key ratios against the targets and
# speed-up chart, then the `loader` suite (LOADER_ARGS: its extra arguments), then the distilled training run
# of bench/train_check.py (TRAIN_ARGS: its arguments after the folder). Everything goes to $RESULTS (default bench/results/) named DATE_CARD_*, and to $OUT
# when set. Runs from a checkout with the machine's own python3 (PYTHON=... to choose another) and no
# install: the repository goes on PYTHONPATH, and so do the wheels under bench/wheels/ (WHEELS_DIR) when
# carried there (bench/gpu_wheels.sh downloads them: timm, which the GPU machine may lack or hold older).
# First, in seconds, it prints the versions it runs with and stops with a one-line reason when something
# is missing or too old (python -m mxa_bench.preflight). Time limits keep the whole run under 8 minutes:
# the tests stop after TESTS_TIMEOUT seconds (100), the suite starts no case after BENCH_BUDGET seconds
# (150) and then writes its outputs, and is killed after BENCH_TIMEOUT seconds (190), the loader suite after
# LOADER_TIMEOUT (60), the training run after TRAIN_TIMEOUT (130): 8 minutes at the very most; the suites' records
# are appended to the .jsonl file as they are measured, so even a killed run keeps what it measured.
#
# Rehearsal on a machine without a GPU: ALLOW_CPU=1, with TESTS (pytest arguments) and BENCH_ARGS (extra
# `mxa bench` arguments, e.g. "--batch 2 --providers eager") to keep it short; the kernels then run in
# Triton's interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
link=$(mktemp -d)
trap 'rm -rf "$link"' EXIT
ln -s "$PWD/bench" "$link/mxa_bench"  # the installed package name of bench/
export PYTHONPATH="$PWD:$link${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
wheels=${WHEELS_DIR:-bench/wheels}  # relative paths (WHEELS_DIR, RESULTS) are the checkout's
if compgen -G "$wheels/*.whl" >/dev/null; then
    for wheel in "$wheels"/*.whl; do  # pure-Python wheels: unpacked, no pip needed
        "$py" -m zipfile -e "$wheel" "$link/site" || { echo "gpu_check.sh: cannot unpack $wheel" >&2; exit 1; }
    done
    export PYTHONPATH="$link/site:$PYTHONPATH"
fi
allow_cpu=()
if [ "${ALLOW_CPU:-0}" = 1 ]; then
    export TRITON_INTERPRET=1  # read by triton at import; without a CUDA device the kernels need it
    allow_cpu=(--allow-cpu)
fi
if ! "$py" -m mxa_bench.preflight ${allow_cpu[@]+"${allow_cpu[@]}"} 2>&1 | tee "$link/versions.txt"; then
    if [ -n "${OUT:-}" ]; then cp "$link/versions.txt" "$OUT/preflight.txt"; fi
    exit 1
fi
card=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
results=${RESULTS:-bench/results}
mkdir -p "$results"
prefix="$results/$(date +%F)_${card}"
status=0
cp "$link/versions.txt" "${prefix}_tests.txt"  # the versions head the tests' output
# every registered op's test files (mxa_kernels.OPS), unless TESTS names others
tests=${TESTS:-$("$py" -c "import mxa_kernels; print(' '.join(t for op in mxa_kernels.OPS.values() for t in op.tests))")}
if [ -z "$tests" ]; then
    echo "gpu_check.sh: no test files: the fused ops' list could not be read" | tee -a "${prefix}_tests.txt"
    status=1
else
    # -o addopts: the project's pytest options name pytest-benchmark, which this machine may lack
    # shellcheck disable=SC2086 - a word list
    timeout "${TESTS_TIMEOUT:-100}" "$py" -m pytest -q -p no:cacheprovider -o addopts=-ra $tests 2>&1 \
        | tee -a "${prefix}_tests.txt" || status=1
fi
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-190}" "$py" -m mxa_model.cli bench --suite full --results-dir "$results" \
    --time-budget "${BENCH_BUDGET:-150}" \
    --json "${prefix}_full.json" --chart "${prefix}_full.png" ${BENCH_ARGS:-} 2>&1 \
    | tee "${prefix}_full.txt" || status=1
# the input pipeline: a loader worker's ms per image on one core, and the batched augmentation on the card
# shellcheck disable=SC2086
timeout "${LOADER_TIMEOUT:-60}" "$py" -m mxa_model.cli bench --suite loader --results-dir "$results" \
    --json "${prefix}_loader.json" ${LOADER_ARGS:-} 2>&1 | tee "${prefix}_loader.txt" || status=1
# a distilled training run at batch 256 (--backend triton --compile reduce-overhead): images/s and the profile line
# shellcheck disable=SC2086
timeout "${TRAIN_TIMEOUT:-130}" "$py" -m mxa_bench.train_check "$link/train" ${TRAIN_ARGS:-} 2>&1 \
    | tee "${prefix}_train.txt" || status=1
if [ -n "${OUT:-}" ]; then cp "${prefix}"_* "$results"/*"_full.jsonl" "$results"/*"_loader.jsonl" "$OUT"/ 2>/dev/null; fi
exit "$status"

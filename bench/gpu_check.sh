#!/usr/bin/env bash
# One GPU validation run: the GPU tests of the fused ops, then the benchmark tables. Everything goes to
# bench/results/ named by date and card, and to $OUT when set. Runs from a checkout with the machine's
# own python3 (PYTHON=... to choose another) and no install: the repository is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
card=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
prefix="bench/results/$(date +%F)_${card}"
status=0
"$py" -m pytest -q -p no:cacheprovider tests/test_mxa_branch_triton.py tests/test_mxa_branch_ref.py \
    tests/test_window_attention.py tests/test_cascaded_attention.py 2>&1 \
    | tee "${prefix}_tests.txt" || status=1
for mode in crop align; do
    "$py" bench/mxa_branch.py --roi-mode "$mode" --json "${prefix}_mxa_branch_${mode}.json" 2>&1 \
        | tee "${prefix}_mxa_branch_${mode}.txt" || status=1
done
"$py" bench/window_attention.py --json "${prefix}_window_attention.json" 2>&1 \
    | tee "${prefix}_window_attention.txt" || status=1
if [ -n "${OUT:-}" ]; then cp "${prefix}"_* "$OUT"/; fi
exit "$status"

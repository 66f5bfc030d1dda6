#!/usr/bin/env bash
# run 22a (H200): CUDA tests of the graphed slot moves and the refactored kernel tests; batched steps and slot moves (eager vs graphed) at 64/128/256; stage attention rows per program 1 vs 4
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
echo "== CUDA tests ($(( $(date +%s) - T0 )) s)"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "moved or swaps" -rfx 2>&1 | grep -E "passed|failed|FAILED|XFAIL|XPASS|Error" | tail -8 | tee $OUT/tests-gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_row_swap.py tests/test_fused_frame.py tests/test_persistent_stage.py tests/test_decode_attention.py -rfx 2>&1 | grep -E "passed|failed|FAILED|XFAIL|XPASS|Error" | tail -20 | tee $OUT/tests.txt
for rows in 1 4; do
  echo "== bench rows $rows ($(( $(date +%s) - T0 )) s)"
  timeout 200 python3 -m dia2stream.tools.bench --presets 2b --frames 30 --compile --kernels triton \
    --batched 64,128,256 --skip-server --steps graph_compiled_triton_cfg2 --batched-attention-rows $rows \
    --json $OUT/bench-rows$rows.json > $OUT/bench-rows$rows.log 2>&1
  echo "rc $?"; grep -E "step graph|batched|slot move|loaded|rror" $OUT/bench-rows$rows.log | cut -c1-300
done
echo "== end ($(( $(date +%s) - T0 )) s)"

#!/usr/bin/env bash
# run 21a (H200): decode attention tests + step-in-flight/decode-stream CUDA tests; bench A/B SDPA vs decode attention
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
echo "== CUDA tests ($(( $(date +%s) - T0 )) s)"
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py -rf 2>&1 | tail -8 | tee $OUT/tests-decode-attention.txt
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_step_in_flight.py tests/test_decode_stream.py -k cuda -rf 2>&1 | tail -4 | tee $OUT/tests-flight-stream.txt
for mode in on off; do
  echo "== bench decode attention $mode ($(( $(date +%s) - T0 )) s)"
  steps=graph_compiled_triton_decattn_cfg2,graph_compiled_triton_sdpa_cfg2
  [ $mode = off ] && steps=graph_compiled_triton_sdpa_cfg2
  timeout ${BENCH_TIMEOUT:-170} python3 -m dia2stream.tools.bench --presets 2b --frames 60 --compile --profile --kernels triton \
    --batched 1,8,64,128 --skip-server --steps $steps --decode-attention $mode --json $OUT/bench-$mode.json > $OUT/bench-$mode.log 2>&1
  echo "rc $?"; grep -E "step graph|batched|loaded|rror" $OUT/bench-$mode.log | cut -c1-400
done
echo "== end ($(( $(date +%s) - T0 )) s)"

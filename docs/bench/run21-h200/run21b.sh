#!/usr/bin/env bash
# run 21b (H200): decode + stage attention tests; the attention kernels alone; batched steps A/B of the stage attention
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== CUDA tests ($(( $(date +%s) - T0 )) s)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py tests/test_kernels.py tests/test_fused_frame.py tests/test_gpu.py \
  -k "decode_attention or kernel_attention or batched_stage_attention" -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -12 | tee $OUT/tests.txt
echo "== attention alone ($(( $(date +%s) - T0 )) s)"
timeout 60 python3 .stage-lead/attn_micro.py 2>&1 | tee $OUT/attn-micro.txt | tail -40
echo "== bench: stage attention on / off ($(( $(date +%s) - T0 )) s)"
timeout ${BENCH_TIMEOUT:-300} python3 -m dia2stream.tools.bench --presets 2b --frames 60 --compile --profile --kernels triton \
  --batched 1,8,64,128,256 --skip-server --steps graph_compiled_triton_cfg2,graph_compiled_triton_stagesdpa_cfg2 \
  --json $OUT/bench-stage.json > $OUT/bench-stage.log 2>&1
echo "rc $?"; grep -E "step graph|batched|loaded|rror" $OUT/bench-stage.log | cut -c1-300
echo "== end ($(( $(date +%s) - T0 )) s)"

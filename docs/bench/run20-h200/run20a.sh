#!/usr/bin/env bash
# run 20a (H200): step in flight and decode stream tokens on CUDA; GPU idle off/on
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
[ -f /tmp/ck2b/model.safetensors ] || python3 -m vendor_dia2 make-checkpoint --preset 2b /tmp/ck2b > /dev/null 2>&1 &
CK=$!
echo "== CUDA tests: step in flight, decode stream ($(( $(date +%s) - T0 )) s)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_step_in_flight.py tests/test_decode_stream.py -k cuda -rA 2>&1 \
  | grep -E "PASS|FAIL|Error|assert|passed|failed" | head -20 | tee $OUT/cuda-tests.txt
echo "== diagnosis: Triton depformer off/off, on/on, on/off ($(( $(date +%s) - T0 )) s)"
timeout 120 python3 .stage-lead/flight_triton.py 2>&1 | grep -v Warn | tail -4 | tee $OUT/flight-triton.txt
wait $CK
echo "== GPU idle: flight/decode-stream ($(( $(date +%s) - T0 )) s)"
for fd in "off off" "on off" "on on"; do
  set -- $fd
  timeout 130 python3 -m dia2stream.tools.gpu_idle --checkpoint /tmp/ck2b --mimi random --calls 1,64 --steps 40 \
    --step-in-flight $1 --decode-stream $2 --json $OUT/idle-$1-$2.json 2>&1 | grep "calls: step" | sed "s/^/$1 $2 /"
done
echo "== end ($(( $(date +%s) - T0 )) s)"

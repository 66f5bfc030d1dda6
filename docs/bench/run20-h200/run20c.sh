#!/usr/bin/env bash
# run 20c (H200): CUDA tests at the PCM tolerance; call-centre 64 and 128 with the default flags
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
echo "== CUDA tests ($(( $(date +%s) - T0 )) s)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_step_in_flight.py tests/test_decode_stream.py -k cuda 2>&1 | tail -2 | tee $OUT/cuda-tests.txt
for n in ${CALLS:-64 128}; do
  echo "== call-centre $n ($(( $(date +%s) - T0 )) s)"
  STAGES=callcentre CALLS_CC="$n" CALLS_LOCK=" " TURNS=3 WINDOW=15 MAX_CALLS=$(( n > 64 ? n : 64 )) \
    timeout ${CC_TIMEOUT:-230} bash scripts/gpu_bench.sh 2>&1 | grep -v "random weights" | grep -E "onset|underruns|calls $n|samples|server up" 
done
echo "== end ($(( $(date +%s) - T0 )) s)"

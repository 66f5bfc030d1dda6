#!/usr/bin/env bash
# run 21d (H200): call-centre 64 and 128 with the default flags (decode attention, batched stage attention)
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
for n in ${CALLS:-64 128}; do
  echo "== call-centre $n ($(( $(date +%s) - T0 )) s)"
  STAGES=callcentre CALLS_CC="$n" CALLS_LOCK=" " TURNS=3 WINDOW=15 MAX_CALLS=$(( n > 64 ? n : 64 )) SERVER_ARGS="--decode-attention off" \
    timeout ${CC_TIMEOUT:-225} bash scripts/gpu_bench.sh 2>&1 | grep -v "random weights" | grep -E "onset|underruns|calls $n|samples|server up|step_ms|host_ms"
done
echo "== end ($(( $(date +%s) - T0 )) s)"

#!/usr/bin/env bash
# run 22c (H200): call-centre with graphed swaps off / on (RUNS="off:64 on:128"); then the kernel CUDA tests
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
for run in ${RUNS:-off:64 on:128}; do
  g=${run%:*}; n=${run#*:}
  echo "== call-centre $n graphed swaps $g ($(( $(date +%s) - T0 )) s)"
  mkdir -p $OUT/g$g-$n
  OUT=$OUT/g$g-$n STAGES=callcentre CALLS_CC="$n" CALLS_LOCK=" " TURNS=3 WINDOW=15 MAX_CALLS=$n SERVER_ARGS="--graphed-swaps $g" \
    timeout 260 bash scripts/gpu_bench.sh 2>&1 | grep -v "random weights" | grep -E "onset|underruns|calls $n|samples|server up|rror" | cut -c1-200
  rm -f $OUT/g$g-$n/server-*.log.gz; gzip -f $OUT/g$g-$n/server-*.log 2>/dev/null
done
if [ -n "${TESTS:-}" ]; then
  echo "== kernel tests ($(( $(date +%s) - T0 )) s)"
  timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_fused_frame.py tests/test_persistent_stage.py tests/test_decode_attention.py -rfx 2>&1 | grep -E "passed|failed|FAILED|XFAIL|XPASS|Error" | tail -20 | tee $OUT/tests.txt
fi
echo "== end ($(( $(date +%s) - T0 )) s)"

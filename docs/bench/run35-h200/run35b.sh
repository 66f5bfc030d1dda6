#!/usr/bin/env bash
# run 35b (H200): the launch-path sync test; issue 18's call-centre table with a step trace and a
# py-spy profile of the engine at ~64 calls (one server, --max-calls 128)
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
D=/tmp/r35; rm -rf $D
mkdir -p $D
if [ -n "${TESTS:-}" ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "${TESTS}" -rf --tb=short 2>&1 | tail -30 | tee $D/tests.txt
  echo "== tests done ($(( $(date +%s) - T0 )) s)"
fi
spy() {  # one py-spy profile of the engine process once ~40 calls are up
  for _ in $(seq 1 400); do
    h=$(python3 -c "import urllib.request,json; d=json.loads(urllib.request.urlopen('http://127.0.0.1:8765/health',timeout=2).read()); print(d['calls'], d.get('engine_pid'))" 2>/dev/null)
    set -- $h
    if [ -n "${1:-}" ] && [ "$1" -ge "${SPY_AT:-40}" ]; then
      /tmp/dia2-site/bin/py-spy record --pid "$2" --duration 12 --rate 250 --format raw --nonblocking --output $D/pyspy.txt > $D/pyspy.log 2>&1
      return
    fi
    sleep 0.5
  done
}
spy &
OUT=$D STAGES=callcentre CALLS_CC="${SIZES_CC:-64 128 1}" CALLS_LOCK="${SIZES_LOCK:-64}" TURNS=3 WINDOW=15 MAX_CALLS=128 \
  SERVER_ARGS="--step-trace $D/steps.jsonl ${EXTRA:-}" timeout ${LIMIT:-420} bash scripts/gpu_bench.sh 2>&1 \
  | grep -v "random weights" | grep -E "==|onset|underrun|stall|samples|server up|rror|first|next|barge" | cut -c1-160
echo "== bench done ($(( $(date +%s) - T0 )) s)"
tail -3 $D/pyspy.log 2>/dev/null
python3 -m dia2stream.tools.step_trace $D/steps.jsonl --json $D/steps-summary.json 2>&1 | tail -30
gzip -f $D/server-*.log $D/steps.jsonl 2>/dev/null
rm -f $D/results.tgz $D/gpu-util-* 
tar -czf $OUT/all.tgz -C $D . 2>/dev/null
echo "== end ($(( $(date +%s) - T0 )) s)"

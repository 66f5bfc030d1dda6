#!/usr/bin/env bash
# run 35a (H200): issue 18's call-centre table on the real GPU with a step trace (one server, --max-calls 128)
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
D=$OUT/cc
mkdir -p $D
OUT=$D STAGES=callcentre CALLS_CC="${SIZES_CC:-1 64 128}" CALLS_LOCK="${SIZES_LOCK:-64}" TURNS=3 WINDOW=15 MAX_CALLS=128 \
  SERVER_ARGS="--step-trace $D/steps.jsonl ${EXTRA:-}" timeout ${LIMIT:-500} bash scripts/gpu_bench.sh 2>&1 \
  | grep -v "random weights" | grep -E "==|onset|underrun|samples|server up|rror|first|next|barge" | cut -c1-220
echo "== bench done ($(( $(date +%s) - T0 )) s)"
python3 -m dia2stream.tools.step_trace $D/steps.jsonl --json $D/steps-summary.json 2>&1 | tail -30
gzip -f $D/server-*.log $D/steps.jsonl 2>/dev/null
rm -f $D/results.tgz
echo "== end ($(( $(date +%s) - T0 )) s)"

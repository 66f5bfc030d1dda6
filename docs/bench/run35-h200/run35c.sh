#!/usr/bin/env bash
# run 35c (H200): after the start-path fixes: issue 18's call-centre 64/128 and lock-step 64 with a
# step trace; then the launch-path sync test and the sync probe of the command paths
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
D=/tmp/r35; rm -rf $D; mkdir -p $D
OUT=$D STAGES=callcentre CALLS_CC="${SIZES_CC:-64 128}" CALLS_LOCK="${SIZES_LOCK:-64}" TURNS=3 WINDOW=15 MAX_CALLS=128 \
  SERVER_ARGS="--step-trace $D/steps.jsonl" timeout ${LIMIT:-260} bash scripts/gpu_bench.sh 2>&1 \
  | grep -v "random weights" | grep -E "==|onset|underrun|stall|samples|server up|rror|first|next|barge" | cut -c1-160
echo "== bench done ($(( $(date +%s) - T0 )) s)"
python3 -m dia2stream.tools.step_trace $D/steps.jsonl --json $D/steps-summary.json 2>&1 | tail -22
gzip -f $D/server-*.log $D/steps.jsonl 2>/dev/null
rm -f $D/results.tgz $D/gpu-util-*
tar -czf $OUT/all.tgz -C $D . 2>/dev/null
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k never_wait -rf --tb=short 2>&1 | grep -v Warn | tail -12 | tee $D/tests.txt
echo "== tests done ($(( $(date +%s) - T0 )) s)"
timeout 90 python3 .stage-lead/sync_probe.py cuda 2>&1 | grep -v Warning | tail -20 | cut -c1-330 | tee $D/probe.txt
tar -czf $OUT/all.tgz -C $D . 2>/dev/null
echo "== end ($(( $(date +%s) - T0 )) s)"

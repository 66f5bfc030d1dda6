#!/usr/bin/env bash
# run 22b (H200): slot moves eager vs graphed (64 slots); call-centre 64 with --graphed-swaps on
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
echo "== bench moves ($(( $(date +%s) - T0 )) s)"
timeout 150 python3 -m dia2stream.tools.bench --presets 2b --frames 20 --compile --kernels triton \
  --batched 64 --skip-server --steps graph_compiled_triton_cfg2 --json $OUT/bench-moves.json > $OUT/bench-moves.log 2>&1
echo "rc $?"; grep -E "batched|slot move|rror" $OUT/bench-moves.log | cut -c1-300
echo "== row swap tests ($(( $(date +%s) - T0 )) s)"
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_row_swap.py -rfx 2>&1 | tail -2 | tee $OUT/tests-row-swap.txt
for g in ${GRAPHED:-on}; do
  echo "== call-centre 64 graphed swaps $g ($(( $(date +%s) - T0 )) s)"
  mkdir -p $OUT/g$g
  OUT=$OUT/g$g STAGES=callcentre CALLS_CC="64" CALLS_LOCK=" " TURNS=3 WINDOW=15 MAX_CALLS=64 SERVER_ARGS="--graphed-swaps $g" \
    timeout 240 bash scripts/gpu_bench.sh 2>&1 | grep -v "random weights" | grep -E "onset|underruns|calls 64|samples|server up|step_ms|host_ms|moves|rror" | tee $OUT/g$g/summary.txt
done
echo "== end ($(( $(date +%s) - T0 )) s)"

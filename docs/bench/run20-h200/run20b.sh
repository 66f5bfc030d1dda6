#!/usr/bin/env bash
# run 20b (H200): one call through the server: step in flight / decode stream
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
[ -f /tmp/ck2b/model.safetensors ] || python3 -m vendor_dia2 make-checkpoint --preset 2b /tmp/ck2b > /dev/null 2>&1 &
CK=$!
echo "== PCM diff diagnosis ($(( $(date +%s) - T0 )) s)"
timeout 150 python3 .stage-lead/pcm_diff.py 2>&1 | grep -v Warn | tail -3 | tee $OUT/pcm-diff.txt
wait $CK
mkdir -p /tmp/bench && ln -sfn /tmp/ck2b /tmp/bench/2b
for fd in "${@:-off off}"; do
  set -- $fd
  echo "== server, one call, step in flight $1, decode stream $2 ($(( $(date +%s) - T0 )) s)"
  timeout 200 python3 -m dia2stream.tools.bench --presets 2b --checkpoint-dir /tmp/bench --mimi random --frames 20 --runs 10 \
    --compile --kernels triton --steps graph_compiled_triton_cfg2 --step-in-flight $1 --decode-stream $2 \
    --json $OUT/server-$1-$2.json > $OUT/server-$1-$2.log 2>&1
  grep -E "first byte|step graph" $OUT/server-$1-$2.log | cut -c1-200
done
echo "== end ($(( $(date +%s) - T0 )) s)"

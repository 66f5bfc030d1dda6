#!/usr/bin/env bash
# Issue 24's levers that were built but not yet timed, in one device call of under 10 minutes:
# the batched frame step (2b, cfg 2, compiled, Triton depformer) at 1, 64, 128 and 256 calls
#   1. at the default flags;
#   2. with --compile-dynamic on (a shorter cold start? run 38 could not tell; is the step slower?);
#   3. with --batched-attention-rows 8 (the batched stages' attention reading each stage's maps
#      once for eight rows; built on the CPU after run 21, never timed).
# Each variant builds its own stepper (compile and capture: ~50-90 s cold); the log says how long.
# Usage, after `make gpu-wheels` (carry .whl): OUT=$OUT bash scripts/gpu_issue24.sh
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
OUT=${OUT:-/tmp/gpu24}; mkdir -p "$OUT"
since() { echo "== $1 ($(( $(date +%s) - T0 )) s)"; }
bench() {  # bench NAME LIMIT_S EXTRA_ARGS...: the batched steps only, one JSON per variant
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m dia2stream.tools.bench --presets 2b --mimi random --frames 60 --compile --kernels triton \
    --batched "${CALLS:-1,64,128,256}" --skip-server --steps graph_compiled_triton_cfg2 --json "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  grep -E "batched|build" "$OUT/$name.log" | cut -c1-200 | tail -8
  since "$name done"
}
bench default 170
bench compile-dynamic 170 --compile-dynamic on
bench attention-rows-8 170 --batched-attention-rows 8
tar -czf "$OUT/all.tgz" -C "$OUT" --exclude all.tgz . 2>/dev/null
since end

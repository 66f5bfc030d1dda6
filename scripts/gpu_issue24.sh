#!/usr/bin/env bash
# Issue 24's figures, in one device call of under 10 minutes (run 39):
#   1. the batched frame step (2b, cfg 2, compiled, Triton depformer) at 1, 64, 128 and 256 calls
#      with the sorted torch draw (`--sampler torch`);
#   2. the same with the fused draw (`--sampler triton`; the server's default since run 39);
#   3. one call through the real server (first byte and onset of `start`, of `inject` right after
#      `done`), with the sorted draw.
# (--batched-attention-rows 8 is not run: 4 rows a program was slower than 1 at every size, run 22.)
# Each variant builds its own stepper (compile and capture: ~50-90 s cold); the log says how long.
# PART=startup instead: where a cold start's time goes (scripts/startup_profile.py: the server's
# engine built under cProfile, fresh compile caches, recompiles logged), default and --compile-dynamic on.
# PART=verify: the server's defaults since run 39 (the fused draw): the fused draw's whole-frame token
# tests, one call through the server, 8-32 calls, a cold start (VERIFY="tests server small cold").
# Usage, after `make gpu-wheels` (carry .whl): OUT=$OUT [PART=startup|verify] bash scripts/gpu_issue24.sh
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
OUT=${OUT:-/tmp/gpu24}; mkdir -p "$OUT"
since() { echo "== $1 ($(( $(date +%s) - T0 )) s)"; }
CKPT=/tmp/dia2-bench/2b  # the bench's own checkpoint folder, shared by every part
checkpoint() { [[ -f $CKPT/model.safetensors ]] || python3 -m vendor_dia2 make-checkpoint --preset 2b "$CKPT" > /dev/null; }
server_bench() {  # server_bench LIMIT_S STEP_VARIANT: one call through the real server, 10 runs
  timeout "$1" python3 -m dia2stream.tools.bench --presets 2b --mimi random --frames 60 --compile --kernels triton \
    --steps "$2" --runs 10 --json "$OUT/server.json" > "$OUT/server.log" 2>&1
  grep -E "first byte|rror" "$OUT/server.log" | cut -c1-200 | tail -4
}
bench() {  # bench NAME LIMIT_S EXTRA_ARGS...: the batched steps only, one JSON per variant
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m dia2stream.tools.bench --presets 2b --mimi random --frames 60 --compile --kernels triton \
    --batched "${CALLS:-1,64,128,256}" --skip-server --steps graph_compiled_triton_cfg2 --json "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  grep -E "batched|build" "$OUT/$name.log" | cut -c1-200 | tail -8
  since "$name done"
}
if [ "${PART:-steps}" = verify ]; then  # the server's defaults after run 39; VERIFY picks and orders the parts
  for part in ${VERIFY:-tests server small cold}; do
    case $part in
      tests)  # the fused draw's whole-frame token tests, as many as fit
        timeout "${TESTS_S:-120}" python3 -m pytest -v tests/test_fused_frame.py > "$OUT/tests-fused.txt" 2>&1
        grep -cE "PASSED" "$OUT/tests-fused.txt"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests-fused.txt" | tail -5 ;;
      server)  # one call through the server at its defaults (the fused draw)
        server_bench 150 graph_compiled_triton_cfg2 ;;
      small)  # issue 24's 32-call target, not measured since run 13
        CALLS=8,16,32 bench batched-small 110 --sampler auto ;;
      cold)  # a cold start of the server's engine, no profiler
        checkpoint
        timeout 200 python3 scripts/startup_profile.py --no-profile -- --checkpoint "$CKPT" --mimi random \
          --max-calls 128 > "$OUT/startup-verify.log" 2>&1
        grep -E "captured|ready in|open in|engine built" "$OUT/startup-verify.log" | cut -c1-160 ;;
    esac
    since "$part done"
    tar -czf "$OUT/all.tgz" -C "$OUT" --exclude all.tgz . 2>/dev/null
  done
  exit 0
fi
if [ "${PART:-steps}" = startup ]; then
  checkpoint; since "checkpoint written"
  for start in default dynamic; do  # each cold: its own empty compile caches
    flag=off; [ $start = dynamic ] && flag=on
    TORCH_LOGS=recompiles timeout 270 python3 scripts/startup_profile.py --out "$OUT/startup-$start" -- \
      --checkpoint "$CKPT" --mimi random --max-calls 128 --compile-dynamic $flag --compile-cache /tmp/compile-$start \
      > "$OUT/startup-$start.log" 2>&1
    grep -E "captured|ready in|under the profiler|^ {0,2}[a-zA-Z(].* s +[0-9]+ calls" "$OUT/startup-$start.log" | cut -c1-160
    echo "recompiles: $(grep -c 'Recompiling function' "$OUT/startup-$start.log")"
    since "$start cold start done"
  done
  tar -czf "$OUT/all.tgz" -C "$OUT" --exclude all.tgz . 2>/dev/null
  exit 0
fi
bench sorted-draw 170 --sampler torch
bench fused-draw 170 --sampler triton
server_bench 190 graph_compiled_triton_sortdraw_cfg2
since "server done"
tar -czf "$OUT/all.tgz" -C "$OUT" --exclude all.tgz . 2>/dev/null
since end

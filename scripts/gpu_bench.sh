#!/usr/bin/env bash
# The GPU benchmark in one command, for a CUDA machine that has torch but not moshi, websockets,
# soundfile, soxr or prometheus_client (like the lent H100): installs the wheels `make gpu-wheels`
# put in .whl/, runs the GPU tests, the frame-step/onset benchmark, then the real server with
# --max-calls 64 under the load script at 1, 8, 16, 32 and 64 concurrent calls, and a rollover run
# (a short context, so long turns rebuild it mid-utterance). Random 2b checkpoint written locally;
# nothing downloaded. Results land in $OUT (default .) as JSON and logs.
#   scripts/gpu_bench.sh                  # everything
#   STAGES=load scripts/gpu_bench.sh      # only the server under load
#   STAGES=callcentre CALLS_CC="64 128" CALLS_LOCK=64 LOCK_FIRST=1 scripts/gpu_bench.sh   # issue 18's patterns
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl
  export PYTHONPATH="/tmp/dia2-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 DIA2_CACHE="${DIA2_CACHE:-/tmp/dia2cache}"
STAGES="${STAGES:-tests,bench,load,rollover}"
CKPT="${CKPT:-/tmp/dia2-bench/2b}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__)'

if [[ $STAGES == *tests* ]]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py > "$OUT/gpu-tests.log" 2>&1; tail -3 "$OUT/gpu-tests.log"
fi
if [[ $STAGES == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m dia2stream.tools.bench --presets 2b --frames 100 --runs 10 --compile ${BENCH_ARGS:-} \
    --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  grep -v '^ *"\|^ *[]}{]\|^ *[0-9],*$' "$OUT/bench.log" | tail -25
fi
if [[ $CKPT == /* && ! -f $CKPT/model.safetensors ]]; then python3 -m vendor_dia2 make-checkpoint --preset 2b "$CKPT" > /dev/null; fi

health() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8765/health', timeout=2).read().decode())"; }
serve() {  # serve NAME ARGS...: the real server in the background, waits for /health
  local name=$1; shift
  python3 server.py --checkpoint "$CKPT" --mimi "${MIMI:-random}" --port 8765 --log-level INFO "$@" > "$OUT/server-$name.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 240); do
    health > /dev/null 2>&1 && return 0
    sleep 1
  done
  echo "server $name did not come up"; tail -20 "$OUT/server-$name.log"; return 1
}
stop() { kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; }
# While a load runs: /health (step_ms, step_calls, host_ms) and the GPU's busy share (nvidia-smi's
# utilization.gpu: the share of each sample period with a kernel running) every 0.5 s.
sample() {
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$OUT/gpu-util-$1.txt" 2>/dev/null &
  local smi=$!
  trap 'kill $smi 2>/dev/null; exit 0' TERM
  while true; do health >> "$OUT/health-$1.jsonl" 2>/dev/null; sleep 0.5; done
}
summarise() {  # the samples taken while calls were active
  python3 - "$OUT/health-$1.jsonl" "$OUT/gpu-util-$1.txt" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
rows = [r for r in rows if r.get("calls", 0) > 0]
util = [float(x) for x in open(sys.argv[2]).read().split() if x.replace(".", "").isdigit()]
def q(xs, f): return round(sorted(xs)[min(len(xs) - 1, int(f * len(xs)))], 2) if xs else None
host = [r["host_ms"] for r in rows]; step = [r["step_ms"] for r in rows]
print(f"samples {len(rows)}: host_ms p50 {q(host, .5)} p95 {q(host, .95)}; step_ms p50 {q(step, .5)} p95 {q(step, .95)}; "
      f"calls max {max((r['calls'] for r in rows), default=0)}; GPU busy % p50 {q(util, .5)} mean "
      f"{round(statistics.mean(util), 1) if util else None}")
PY
}

if [[ $STAGES == *load* ]]; then
  t0=$(date +%s)
  serve load --max-calls 64 --compile "${COMPILE:-off}" ${SERVER_ARGS:-} && echo "server up in $(( $(date +%s) - t0 )) s: $(health)"
  for n in ${CALLS:-1 8 16 32 64}; do
    python3 -m dia2stream.tools.load ws://127.0.0.1:8765/ --calls "$n" --turns 3 --pause-every 3 --ramp 1 --quiet \
      --json "$OUT/load-$n.json" > "$OUT/load-$n.txt" 2>&1
    echo "== $n calls (health after: $(health))"; tail -22 "$OUT/load-$n.txt"
  done
  stop
fi
if [[ $STAGES == *callcentre* ]]; then  # issue 18's targets: the call-centre pattern, then lock-step
  t0=$(date +%s)
  serve callcentre --max-calls "${MAX_CALLS:-128}" --compile "${COMPILE:-auto}" ${SERVER_ARGS:-} && \
    echo "server up in $(( $(date +%s) - t0 )) s: $(health)"
  call_centre() {
    for n in ${CALLS_CC:-1 64 128}; do
      sample "callcentre-$n" &
      SAMPLER=$!
      python3 -m dia2stream.tools.load ws://127.0.0.1:8765/ --pattern call-centre --calls "$n" --turns "${TURNS:-4}" \
        --arrival-window "${WINDOW:-20}" --seed 1 --quiet --json "$OUT/callcentre-$n.json" > "$OUT/callcentre-$n.txt" 2>&1
      kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null
      echo "== call-centre, $n calls (health after: $(health))"; cat "$OUT/callcentre-$n.txt"; summarise "callcentre-$n"
    done
  }
  lock_step() {  # LOCK_RUNS: runs of each size ("0, in every run"); LOCK_TAG: in the file names; AFTER_LOCK: a command after them
    for n in ${CALLS_LOCK:-64}; do
      for r in $(seq 1 "${LOCK_RUNS:-1}"); do
        local name="lockstep-$n${LOCK_TAG:+-$LOCK_TAG}"; [[ ${LOCK_RUNS:-1} == 1 ]] || name="$name-run$r"
        python3 -m dia2stream.tools.load ws://127.0.0.1:8765/ --calls "$n" --turns 3 --pause-every 3 --ramp 1 --quiet \
          --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
        echo "== lock-step, $n calls, run $r (health after: $(health))"; tail -12 "$OUT/$name.txt"
      done
    done
    eval "${AFTER_LOCK:-}"
  }
  if [[ -n ${LOCK_FIRST:-} ]]; then lock_step; call_centre; else call_centre; lock_step; fi  # LOCK_FIRST: if cut short
  stop
fi
if [[ $STAGES == *rollover* ]]; then
  serve rollover --max-calls 8 --context-frames 400 --compile "${COMPILE:-off}"
  LONG="[S1] $(for i in $(seq 1 120); do printf 'word%d ' "$i"; done)done."
  python3 -m dia2stream.tools.load ws://127.0.0.1:8765/ --calls 8 --turns 2 --text "$LONG" --quiet \
    --json "$OUT/load-rollover.json" > "$OUT/load-rollover.txt" 2>&1
  tail -22 "$OUT/load-rollover.txt"
  stop
  grep -h "rolled over" "$OUT/server-rollover.log" | sed 's/.*: //' | sort | uniq -c | tail -5
  grep -ho "last [0-9]* frames, [0-9.]* ms" "$OUT/server-rollover.log" | awk '{print $4}' | sort -n | \
    awk '{a[NR]=$1} END {if (NR) print "rollover rebuild ms: n", NR, "p50", a[int((NR+1)/2)], "max", a[NR]}'
fi
# the device tool brings back few files: everything in one archive too
tar -czf "$OUT/results.tgz" -C "$OUT" --exclude results.tgz . 2>/dev/null || true

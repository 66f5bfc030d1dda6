#!/usr/bin/env bash
# The scheduling targets of issue 18 on the simulated GPU (engine/simulated.py): the real server
# on this machine's CPU with the frame step and Mimi decode timed from a GPU profile. Every figure
# this prints is SIMULATED (it says nothing about the model; it measures scheduling and the host).
#
#   PROFILE=profiles/h100-2b.json OUT=docs/bench/sim-h100 bash scripts/sim_bench.sh
#   CALLS_CC="1 64 128" CALLS_LOCK="64" TURNS=4 WINDOW=20 bash scripts/sim_bench.sh
#   SERVER_ARGS="--step-in-flight on" bash scripts/sim_bench.sh     # extra server flags
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PROFILE=${PROFILE:-profiles/h100-2b.json}
OUT=${OUT:-/tmp/sim-bench}
PORT=${PORT:-8799}
mkdir -p "$OUT"
health() { curl -sf "http://127.0.0.1:$PORT/health"; }
serve() {
  local name=$1; shift
  # shellcheck disable=SC2086  # SERVER_ARGS: extra server flags, word-split on purpose
  $PY server.py --simulate-gpu "$PROFILE" --port "$PORT" --log-level WARNING "$@" ${SERVER_ARGS:-} > "$OUT/server-$name.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 120); do health > /dev/null 2>&1 && return 0; sleep 0.5; done
  echo "server $name did not come up"; tail -20 "$OUT/server-$name.log"; return 1
}
stop() { kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; }
trap stop EXIT

for n in ${CALLS_CC:-1 64 128}; do
  max=$(( n > 64 ? n : 64 ))
  serve "cc-$n" --max-calls "$max" || exit 1
  $PY -m dia2stream.tools.load "ws://127.0.0.1:$PORT/" --pattern call-centre --calls "$n" --turns "${TURNS:-4}" \
    --arrival-window "${WINDOW:-20}" --seed 1 --quiet --json "$OUT/callcentre-$n.json" > "$OUT/callcentre-$n.txt" 2>&1
  echo "== call-centre, $n calls, simulated $(basename "$PROFILE" .json) (health after: $(health))"
  cat "$OUT/callcentre-$n.txt"
  stop
done
for n in ${CALLS_LOCK:-64}; do
  serve "lock-$n" --max-calls "$(( n > 64 ? n : 64 ))" || exit 1
  $PY -m dia2stream.tools.load "ws://127.0.0.1:$PORT/" --calls "$n" --turns 3 --pause-every 3 --ramp 1 --quiet \
    --json "$OUT/lockstep-$n.json" > "$OUT/lockstep-$n.txt" 2>&1
  echo "== lock-step, $n calls, simulated $(basename "$PROFILE" .json) (health after: $(health))"
  cat "$OUT/lockstep-$n.txt"
  stop
done

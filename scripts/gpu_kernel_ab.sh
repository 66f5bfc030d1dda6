#!/usr/bin/env bash
# Issue 24 on a CUDA machine in one command: the kernel tests, the one-call frame step with each
# change on and off (sorted vs fused draw, without and with programmatic dependent launch), with
# a kernel profile, the batched steps and one call through the server, then the tile sweep. Installs the wheels of `make gpu-wheels` from $WHL
# (default .whl). Results land in $OUT (default .) as JSON and logs.
#   OUT=/tmp/o scripts/gpu_kernel_ab.sh
#   STAGES=sweep scripts/gpu_kernel_ab.sh
#   STAGES=tests,pick,bench scripts/gpu_kernel_ab.sh   # pick: scripts/pick_bench.py, the draw alone
#   STAGES=tests,ab scripts/gpu_kernel_ab.sh   # ab: each AB_STEPS variant in its own bench process
#   TESTS=tests/test_persistent_stage.py STAGES=tests,ab \
#     AB_STEPS=graph_compiled_triton_sortdraw_cfg2,graph_compiled_triton_sortdraw_persist_cfg2 scripts/gpu_kernel_ab.sh
#     # the persistent stage (`_persist`: `--persistent-stage on`, batched rows too) against the default
# The whole-frame token tests run first: on a fresh machine their Triton compiles take minutes
# (run 15 cut them at 220 s inside the first case).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
WHL="${WHL:-.whl}"
if compgen -G "$WHL/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site "$WHL"/*.whl
  export PYTHONPATH="/tmp/dia2-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 DIA2_CACHE="${DIA2_CACHE:-/tmp/dia2cache}"
STAGES="${STAGES:-tests,bench,sweep}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

if [[ $STAGES == *tests* ]]; then
  timeout "${TESTS_TIMEOUT:-480}" python3 -m pytest -v -p no:cacheprovider ${TESTS:-tests/test_persistent_stage.py \
    tests/test_fused_frame.py tests/test_gpu.py tests/test_kernels.py tests/test_fused_pick.py} \
    -k "${TESTS_K:-not nothing}" > "$OUT/gpu-tests.log" 2>&1
  tests_rc=$?
  echo "tests rc $tests_rc"; grep -E "passed|failed|Error|^FAILED" "$OUT/gpu-tests.log" | tail -12
  # with GATE_PERSIST, a persistent stage whose kernel tests failed (or hung: rc 124) is not timed
  if [[ -n ${GATE_PERSIST:-} ]] && { [[ $tests_rc == 124 ]] || \
      grep -qE "^FAILED .*(one_launch|full_size|counters)" "$OUT/gpu-tests.log"; }; then
    AB_STEPS="$(tr , '\n' <<<"${AB_STEPS:-}" | grep -v persist | paste -sd,)"; echo "persist variants dropped"
  fi
fi
if [[ $STAGES == *pick* ]]; then  # the draw alone: sorted vs fused, by warps and select bits
  timeout "${PICK_TIMEOUT:-90}" python3 scripts/pick_bench.py --json "$OUT/pick.json" > "$OUT/pick.log" 2>&1
  echo "pick rc $?"; cut -c1-400 "$OUT/pick.log" | tail -6
fi
if [[ $STAGES == *bench* ]]; then
  # one process: the one-call step with each change off and on (profiled), the batched steps,
  # then one call through the real server (onset)
  timeout "${BENCH_TIMEOUT:-400}" python3 -m dia2stream.tools.bench --presets 2b --frames 100 --runs "${RUNS:-10}" \
    --compile --profile --kernels triton --batched "${BATCHED:-1,8,16,32,64,128,256}" --json "$OUT/bench.json" \
    --steps "${AB_STEPS:-graph_compiled_triton_sortdraw_nopdl_cfg2,graph_compiled_triton_nopdl_cfg2,graph_compiled_triton_cfg2}" \
    ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc $?"; grep -E "step graph|batched|server|loaded|error|Error" "$OUT/bench.log" | cut -c1-330
fi
if [[ $STAGES == *ab* ]]; then
  # one process per variant: steppers built in one process recompile the same functions, and in
  # run 15 each later variant's decoder-only lane ran 0.1-0.3 ms slower for it
  steps="${AB_STEPS:-graph_compiled_triton_sortdraw_cfg2,graph_compiled_triton_cfg2}"
  for v in ${steps//,/ }; do
    sampler=auto; [[ $v == *sortdraw* ]] && sampler=torch  # the batched rows draw as the variant does
    persist=off; [[ $v == *persist* ]] && persist=on  # and run their stages as it does
    timeout "${AB_TIMEOUT:-150}" python3 -m dia2stream.tools.bench --presets 2b --frames 100 --compile --profile \
      --kernels triton --sampler "$sampler" --persistent-stage "$persist" --batched "${BATCHED:-1,64}" --skip-server \
      --steps "$v" \
      --json "$OUT/ab-$v.json" \
      > "$OUT/ab-$v.log" 2>&1
    echo "ab $v rc $?"; grep -E "step graph|batched|error|Error" "$OUT/ab-$v.log" | cut -c1-200
  done
fi
if [[ $STAGES == *sweep* ]]; then
  timeout "${SWEEP_TIMEOUT:-200}" python3 scripts/kernel_sweep.py --rows "${SWEEP_ROWS:-2,16,64,256}" --weights bf16 --wide \
    --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
  echo "sweep rc $?"; grep -v "^  " "$OUT/sweep.log" | tail -45
fi

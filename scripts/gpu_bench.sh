#!/usr/bin/env bash
# The GPU benchmark in one command, for a CUDA machine that has torch but not moshi, websockets
# or soundfile (like the lent H100): installs the wheels `make gpu-wheels` put in .whl/, runs the
# GPU tests, then the benchmark (random 2b checkpoint written locally; nothing downloaded).
#   scripts/gpu_bench.sh                 # 2b, compiled + graph + eager, server TTFA, voice prefill
#   PRESETS=1b,2b scripts/gpu_bench.sh --profile
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl
  export PYTHONPATH="/tmp/dia2-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 DIA2_CACHE="${DIA2_CACHE:-/tmp/dia2cache}"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
python3 -m dia2stream.bench --presets "${PRESETS:-2b}" --frames 200 --runs 20 --compile \
  --json "${OUT:-.}/bench.json" "$@"

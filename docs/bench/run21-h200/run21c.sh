#!/usr/bin/env bash
# run 21c (H200): which kernel makes compiled differ from eager (fp32 tiny); test_gpu.py whole; one call through the server
# (tests/test_zz_diag.py was docs/bench/run21-h200/test_zz_diag.py, copied in for the run)
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
echo "== diag ($(( $(date +%s) - T0 )) s)"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_zz_diag.py -s 2>&1 | grep -E "DIAG|passed|failed|Error" | tee $OUT/diag.txt
echo "== test_gpu.py ($(( $(date +%s) - T0 )) s)"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rf 2>&1 | grep -E "passed|failed|FAILED" | tail -12 | tee $OUT/test-gpu.txt
echo "== one call through the server ($(( $(date +%s) - T0 )) s)"
timeout 170 python3 -m dia2stream.tools.bench --presets 2b --mimi random --frames 20 --runs 10 --compile --kernels triton \
  --steps graph_compiled_triton_cfg2 --json $OUT/server.json > $OUT/server.log 2>&1
echo "rc $?"; grep -E "first byte|step graph|rror" $OUT/server.log | cut -c1-250
echo "== end ($(( $(date +%s) - T0 )) s)"

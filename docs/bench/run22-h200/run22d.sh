#!/usr/bin/env bash
# run 22d (H200): the kernel test files (refactored last session), each alone, verbose so a cut run still says what passed
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia2-site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/dia2-site:$PWD" PYTHONUNBUFFERED=1 DIA2_CACHE=/tmp/dia2cache
for f in persistent_stage fused_frame decode_attention; do
  echo "== $f ($(( $(date +%s) - T0 )) s)"
  timeout ${T:-110} python3 -m pytest -v -p no:cacheprovider tests/test_$f.py -rfx > $OUT/test-$f.txt 2>&1
  echo "rc $?"; grep -cE "PASSED" $OUT/test-$f.txt; grep -E "FAILED|XPASS|XFAIL|SKIPPED|passed|failed" $OUT/test-$f.txt | cut -c1-200 | tail -8
done
echo "== end ($(( $(date +%s) - T0 )) s)"

#!/usr/bin/env bash
# Run bench/gpu_check.py on a lent GPU machine, from the repository root, with $OUT set.
# Installs the carried wheels of .whl/ into $GPU_CHECK_SITE (default /tmp/site) unless that
# was done already, puts them and src/ on PYTHONPATH (the package is not pip-installed
# there), and writes OUT/gpu_check.log (everything printed), OUT/gpu_check.json (the figures)
# and the per-step logs OUT/gpu_check_*.log. GPU_CHECK_TINY=1: tiny sizes, for testing here.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check_out}
SITE=${GPU_CHECK_SITE:-/tmp/site}
PY=${GPU_CHECK_PYTHON:-python3}
mkdir -p "$OUT"
if [ ! -d "$SITE/astropy" ] && ls .whl/*.whl >/dev/null 2>&1; then
    timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "WHEELS: install into $SITE failed (rc $?)"
fi
export PYTHONPATH="$SITE:src${PYTHONPATH:+:$PYTHONPATH}"
timeout "${GPU_CHECK_TIMEOUT:-450}" nice -n "${GPU_CHECK_NICE:-0}" "$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit $?  # the last line printed is gpu_check.py's JSON object

#!/bin/bash
# thirty-fourth session: call1.sh cut to what 614 device seconds allow (five attempts at call1 got no machine).
# 16k only: full, asrkf (93cf4ef: gathers of earlier rows beside the decode in flight, the cells' removals queued
# for it) and asrkf-old (both waits put back: the thirty-third session's default), 3 runs in one process, with the
# timeline. carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
A="/tmp/m/llama8b.gguf --decode 256 --runs 3 --timeline"
V='[["full","full",{}],["asrkf","asrkf",{}],["asrkf-old","asrkf",{"_rows_beside":false,"_queue":false}]]'
PYTHONPATH=/tmp/site:. timeout $(( 535 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 16384 \
  --variants "$V" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *[0-9]+ (full|asrkf)" "$OUT/16k.log"; grep timeline "$OUT/16k.log"

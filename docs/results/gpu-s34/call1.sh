#!/bin/bash
# thirty-fourth session, first call. 16k: full, asrkf (gathers of earlier rows beside the decode in flight, the
# cells' removals queued for it: 93cf4ef) and asrkf-old (both waits put back: the thirty-third session's default),
# 3 runs in one process; then 32k and 4k with full and asrkf. --timeline: where the GPU waits for the host between
# asrkf's decodes (a decode's end on the decode thread to the next launch), classed by what ran in the gap.
# carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
A="/tmp/m/llama8b.gguf --decode 256 --runs 3 --timeline"
V='[["full","full",{}],["asrkf","asrkf",{}],["asrkf-old","asrkf",{"_rows_beside":false,"_queue":false}]]'
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 16384 \
  --variants "$V" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *[0-9]+ (full|asrkf)" "$OUT/16k.log"; grep timeline "$OUT/16k.log"
V='[["full","full",{}],["asrkf","asrkf",{}]]'
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 32768 4096 \
  --variants "$V" --json "$OUT/32k4k.json" > "$OUT/32k4k.log" 2>&1
echo "32k 4k done at $(el) s"; grep -E "^ *[0-9]+ (full|asrkf)" "$OUT/32k4k.log"; grep timeline "$OUT/32k4k.log"

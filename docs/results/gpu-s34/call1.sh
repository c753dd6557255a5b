#!/bin/bash
# thirty-fourth session, first call: the final default of the thirty-third (the decode beside the hooks, 50 ms spin)
# at 4k, 16k and 32k against full, 3 runs each, with the new timeline: where the GPU waits for the host between
# asrkf's decodes (from a decode's end on the decode thread to the next launch), classed by what ran in the gap.
# carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
A="/tmp/m/llama8b.gguf --decode 256 --runs 3 --timeline"
V='[["full","full",{}],["asrkf","asrkf",{}]]'
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 16384 4096 32768 \
  --variants "$V" --json "$OUT/lengths.json" > "$OUT/lengths.log" 2>&1
echo "lengths done at $(el) s"; grep -E "^ *[0-9]+ (full|asrkf)" "$OUT/lengths.log"; grep timeline "$OUT/lengths.log" | head -20

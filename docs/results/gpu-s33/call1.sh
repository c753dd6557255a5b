#!/bin/bash
# thirty-third session, first call: a token's decode beside the policy's hooks (Session.overlap, the native decode
# thread) against the same tree one after the other ({"_overlap": false}) and full, 16k, 3 runs in one process; then
# this tree's 32k and 4k bars (full, asrkf; 3 runs) as time allows. carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
A="/tmp/m/llama8b.gguf --decode 256 --runs 3"
PYTHONPATH=/tmp/site:. timeout $(( 480 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 16384 \
  --variants '[["full","full",{}],["asrkf","asrkf",{}],["asrkf-serial","asrkf",{"_overlap":false}]]' \
  --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *16384 " "$OUT/16k.log"
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 32768 4096 \
  --variants '[["full","full",{}],["asrkf","asrkf",{}]]' --json "$OUT/4k-32k.json" > "$OUT/4k-32k.log" 2>&1
echo "4k, 32k done at $(el) s"; grep -E "^ *(4096|32768) |^label" "$OUT/4k-32k.log" | cut -c1-150

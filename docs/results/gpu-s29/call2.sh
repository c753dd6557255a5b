#!/bin/bash
# twenty-ninth session, second call: the question's loan repays at most 64 tokens (a re-evaluation round's
# recover_tokens; the first call repaid all it could: 1.2 ms a token more thaw at 16k). 16k and 4k on the 8B shape,
# 256-token replies, full / asrkf / asrkf with loan 0 (the reselection's set kept), 3 runs each.
# carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build2.log" || exit 1
echo "model at $(el) s"
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --runs 3 --decode 256 --hooks"
V='[["full","full",{}],["asrkf","asrkf",{}],["asrkf-loan0","asrkf",{"loan":0}]]'
PYTHONPATH=/tmp/site:. timeout $(( 470 - $(el) )) $B --lengths 16384 --variants "$V" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; tail -3 "$OUT/16k.log"
PYTHONPATH=/tmp/site:. timeout $(( 575 - $(el) )) $B --lengths 4096 --variants "$V" --json "$OUT/4k.json" > "$OUT/4k.log" 2>&1
echo "4k done at $(el) s"; tail -2 "$OUT/4k.log"

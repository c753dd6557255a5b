#!/bin/bash
# one call (twenty-eighth session): 16k on the 8B shape, 256-token replies, hooks on (_Held.result: this thread's
# waits for a landing's host attention). This tree: full, asrkf, asrkf landing 32 decodes after its queries
# (reeval_lag 32), asrkf judging at most 2,048 due tokens a round (reeval_tokens, oldest due first); then, in a
# second process, the tree of docs/results/gpu-s27/landing-when-done-s27.diff (a landing waits for nothing).
# Before the call: .gpu/land as docs/results/gpu-s27/next-call.sh says, and reeval-tokens-s28.diff (the cap, not
# kept) applied to the working tree; carry [".gpu/kit", ".gpu/land"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh .gpu/land | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --lengths 16384 --runs 3 --decode 256 --hooks"
V='[["full","full",{}],["asrkf","asrkf",{}],["asrkf-lag32","asrkf",{"reeval_lag":32}],["asrkf-cap2048","asrkf",{"reeval_tokens":2048}]]'
PYTHONPATH=/tmp/site:. timeout $(( 500 - $(el) )) $B --variants "$V" --json "$OUT/head.json" > "$OUT/head.log" 2>&1
echo "head done at $(el) s"; tail -4 "$OUT/head.log"
PYTHONPATH=/tmp/site:.gpu/land timeout $(( 590 - $(el) )) $B --variants '[["asrkf-land","asrkf",{}]]' --json "$OUT/land.json" > "$OUT/land.log" 2>&1
echo "land done at $(el) s"; tail -1 "$OUT/land.log"

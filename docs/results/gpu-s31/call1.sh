#!/bin/bash
# thirty-first session, first call: 16k on the 8B shape, 256-token replies, 5 runs without the hooks' timers: full,
# asrkf (the store's arena pages faulted in ahead, efd3c7d), asrkf without that prefault (A/B in one process), and
# asrkf with the interpreter's switch interval at 0.1 ms instead of 5 (the thirtieth session's fourth call saw one
# asrkf run spend 0.48 ms a token handing jobs to the worker thread, the other 0.01). carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
V='[["full","full",{}],["asrkf","asrkf",{}],["asrkf-nopf","asrkf",{"_prefault":false}],["asrkf-si","asrkf",{"_switch_interval":0.0001}]]'
PYTHONPATH=/tmp/site:. timeout $(( 585 - $(el) )) python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --decode 256 \
  --runs 5 --lengths 16384 --variants "$V" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *16384 " "$OUT/16k.log"; grep -E "^label" "$OUT/16k.log" | cut -c1-170

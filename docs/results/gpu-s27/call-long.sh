#!/bin/bash
# a second call (twenty-seventh session): 16k on the 8B shape with replies of 256 tokens, full and asrkf paired,
# hooks on: what a longer reply pays per token once the reply's one-time costs are spread
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_build.sh 2>&1 | tail -3 | tee "$OUT/build-long.log" || exit 1
mkdir -p /tmp/m
test -f /tmp/m/llama8b.gguf || PYTHONPATH=/tmp/site python3 benchmarks/gpu_make_model.py /tmp/m/llama8b.gguf | tail -1
echo "model at $(el) s"
PYTHONPATH=/tmp/site:. timeout $(( 500 - $(el) )) python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --lengths 16384 \
  --runs 3 --decode 256 --hooks --variants '[["full","full",{}],["asrkf","asrkf",{}]]' --json "$OUT/b8-16k-256.json" > "$OUT/b8-16k-256.log" 2>&1
echo "done at $(el) s"; tail -2 "$OUT/b8-16k-256.log"

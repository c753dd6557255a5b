#!/bin/bash
# thirty-first session, second call: where asrkf's 16k prompt read goes on an H100 (9.1 s against full's 0.89 in call1):
# cProfile of the read (gpu_breakdown --profile-prompt), with the decode's hooks, full and asrkf, one run each; then,
# as time allows, 4k and 32k full and asrkf (3 runs, no hooks). carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
V='[["full","full",{}],["asrkf","asrkf",{}]]'
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --decode 256"
PYTHONPATH=/tmp/site:. timeout $(( 560 - $(el) )) $B --hooks --runs 1 --lengths 16384 --variants "$V" \
  --profile-prompt "$OUT/prompt-16k-prof.txt" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *16384 " "$OUT/16k.log"; head -45 "$OUT/prompt-16k-prof.txt" | cut -c1-150
PYTHONPATH=/tmp/site:. timeout $(( 560 - $(el) )) $B --runs 3 --lengths 4096 32768 --variants "$V" --json "$OUT/4k-32k.json" > "$OUT/4k-32k.log" 2>&1
echo "4k, 32k done at $(el) s"; grep -E "^ *(4096|32768) |^label" "$OUT/4k-32k.log" | cut -c1-120

#!/bin/bash
# thirty-second session, first call: asrkf's 16k prompt read on an H100 after the thirty-first session's cuts (pooling,
# float16 kernel, growth) and this session's mirror prefault: cProfile of the read with the decode's hooks (one run of
# full and asrkf), then the 16k bars (3 runs, no hooks) as time allows. carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
V='[["full","full",{}],["asrkf","asrkf",{}]]'
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --decode 256"
PYTHONPATH=/tmp/site:. timeout $(( 570 - $(el) )) $B --hooks --runs 1 --lengths 16384 --variants "$V" \
  --profile-prompt "$OUT/prompt-16k-prof.txt" --json "$OUT/16k-hooks.json" > "$OUT/16k-hooks.log" 2>&1
echo "16k hooks done at $(el) s"; grep -E "^ *16384 " "$OUT/16k-hooks.log"; head -50 "$OUT/prompt-16k-prof.txt" | cut -c1-150
PYTHONPATH=/tmp/site:. timeout $(( 585 - $(el) )) $B --runs 3 --lengths 16384 --variants "$V" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *16384 |^label" "$OUT/16k.log" | cut -c1-150

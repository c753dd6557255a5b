#!/bin/bash
# thirtieth session, second call: the 32k bar over 256-token replies (full, asrkf, 3 runs, 8B shape), then one run
# each of asrkf over llama.cpp's q4_0 cache (new this session) and q4_0 alone at 16k: that it runs on CUDA and at
# what speed. carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --decode 256 --hooks"
V='[["full","full",{}],["asrkf","asrkf",{}]]'
PYTHONPATH=/tmp/site:. timeout $(( 520 - $(el) )) $B --runs 3 --lengths 32768 --variants "$V" --json "$OUT/32k.json" > "$OUT/32k.log" 2>&1
echo "32k done at $(el) s"; grep -E "^ *32768 " "$OUT/32k.log"
V2='[["q4_0","q4_0",{}],["asrkf-q4_0","asrkf-q4_0",{}]]'
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) $B --runs 1 --lengths 16384 --variants "$V2" --json "$OUT/16k-q4.json" > "$OUT/16k-q4.log" 2>&1
echo "q4 done at $(el) s"; grep -E "^label|Error|error" "$OUT/16k-q4.log" | cut -c1-220 | head

#!/bin/bash
# thirtieth session, first call: what llama.cpp's callback path costs a GPU decode (no code change measured).
# 16k on the 8B shape, 256-token replies, 3 runs: full, streaming (same cells, no callback), asrkf, and asrkf with
# its callback set but no decode cut (no observation during the reply, no split capture); then one run of full,
# streaming and asrkf in a process with CUDA graphs off (GGML_CUDA_DISABLE_GRAPHS=1). carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --decode 256 --hooks"
V='[["full","full",{}],["streaming","streaming",{}],["asrkf","asrkf",{}],["asrkf-nocut","asrkf",{"observe_every":1000000,"_split":false}]]'
PYTHONPATH=/tmp/site:. timeout $(( 500 - $(el) )) $B --runs 3 --lengths 16384 --variants "$V" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *16384 " "$OUT/16k.log"
V2='[["full","full",{}],["streaming","streaming",{}],["asrkf","asrkf",{}]]'
GGML_CUDA_DISABLE_GRAPHS=1 PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) $B --runs 1 --lengths 16384 --variants "$V2" --json "$OUT/16k-nographs.json" > "$OUT/16k-nographs.log" 2>&1
echo "no graphs done at $(el) s"; grep -E "^label" "$OUT/16k-nographs.log" | cut -c1-200

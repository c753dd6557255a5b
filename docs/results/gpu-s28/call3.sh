#!/bin/bash
# the last call (twenty-eighth session): 16k on the 8B shape, 256-token replies, hooks on, now also inside a freeze
# and a thaw (the device gather, the store's write and read, the mirror's fill, the upload, the removals); full,
# asrkf, and asrkf freeing cells in groups of 64 (evict_cells 64: a thaw then lands in 1-3 runs of cells instead of
# 3-6 on the CPU emulation), then 4k over 256 tokens. carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build3.log" || exit 1
echo "model at $(el) s"
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --runs 3 --decode 256 --hooks"
V='[["full","full",{}],["asrkf","asrkf",{}],["asrkf-evict64","asrkf",{"evict_cells":64}]]'
PYTHONPATH=/tmp/site:. timeout $(( 470 - $(el) )) $B --lengths 16384 --variants "$V" --json "$OUT/deep.json" > "$OUT/deep.log" 2>&1
echo "16k done at $(el) s"; tail -3 "$OUT/deep.log"
PYTHONPATH=/tmp/site:. timeout $(( 560 - $(el) )) $B --lengths 4096 --variants '[["full","full",{}],["asrkf","asrkf",{}]]' --json "$OUT/4k.json" > "$OUT/4k.log" 2>&1
echo "4k done at $(el) s"; tail -2 "$OUT/4k.log"

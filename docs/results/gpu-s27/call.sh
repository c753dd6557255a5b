#!/bin/bash
# one call (twenty-seventh session): build, the 8B model; 16k with this tree (full, streaming, asrkf, asrkf whose
# background fold uses all 16 of Numba's threads), 5d447ba's asrkf in a second process; then 4k and 32k
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_build.sh .gpu/old 2>&1 | tail -4 | tee "$OUT/build.log" || exit 1
mkdir -p /tmp/m
test -f /tmp/m/llama8b.gguf || PYTHONPATH=/tmp/site python3 benchmarks/gpu_make_model.py /tmp/m/llama8b.gguf | tail -1
echo "model at $(el) s"
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --runs 3 --decode 64 --hooks"
V='[["full","full",{}],["streaming","streaming",{}],["asrkf","asrkf",{}],["asrkf-16t","asrkf",{"_fold_threads":16}]]'
PYTHONPATH=/tmp/site:. timeout $(( 400 - $(el) )) $B --lengths 16384 --variants "$V" --json "$OUT/b8-16k-new.json" > "$OUT/b8-16k-new.log" 2>&1
echo "16k new done at $(el) s"; tail -4 "$OUT/b8-16k-new.log"
PYTHONPATH=/tmp/site:.gpu/old timeout $(( 450 - $(el) )) $B --lengths 16384 --variants '[["asrkf-5d447ba","asrkf",{}]]' --json "$OUT/b8-16k-old.json" > "$OUT/b8-16k-old.log" 2>&1
echo "16k old done at $(el) s"; tail -1 "$OUT/b8-16k-old.log"
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) $B --lengths 4096 32768 --variants '[["full","full",{}],["asrkf","asrkf",{}]]' --json "$OUT/b8-4k32k-new.json" > "$OUT/b8-4k32k-new.log" 2>&1
echo "4k/32k done at $(el) s"; tail -4 "$OUT/b8-4k32k-new.log"

#!/bin/bash
# prepared for the next GPU call (not run in the twenty-seventh session): 16k on the 8B shape with 256-token replies,
# this tree against the same tree with landing-when-done-s27.diff applied, in turn, hooks on (_Held.result shows the
# landings' waits). Before the call, from the repository root:
#   rm -rf .gpu/land && mkdir -p .gpu/land && git archive HEAD asrkf_edge setup.py native pyproject.toml | tar -x -C .gpu/land
#   (cd .gpu/land && patch -p1 < ../../docs/results/gpu-s27/landing-when-done-s27.diff)
# and carry [".gpu/kit", ".gpu/land"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh .gpu/land | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --lengths 16384 --runs 3 --decode 256 --hooks"
PYTHONPATH=/tmp/site:. timeout $(( 420 - $(el) )) $B --variants '[["full","full",{}],["asrkf","asrkf",{}]]' --json "$OUT/head.json" > "$OUT/head.log" 2>&1
echo "head done at $(el) s"; tail -2 "$OUT/head.log"
PYTHONPATH=/tmp/site:.gpu/land timeout $(( 590 - $(el) )) $B --variants '[["asrkf-land","asrkf",{}]]' --json "$OUT/land.json" > "$OUT/land.log" 2>&1
echo "land done at $(el) s"; tail -1 "$OUT/land.log"

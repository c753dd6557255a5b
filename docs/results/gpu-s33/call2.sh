#!/bin/bash
# thirty-third session, second call: call1's decode beside the hooks was no faster (127.4 against 129.4 tok/s at
# 16k). Five variants in one process, 16k, 3 runs: full; asrkf as before (every decode on this thread, "_thread":
# false); every decode on the decode thread, one after the other ("_overlap": false); beside the hooks (default, the
# decode thread and its waiter spin 2 ms before they sleep); and spinning 50 ms. carry [".gpu/kit"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
A="/tmp/m/llama8b.gguf --decode 256 --runs 3"
V='[["full","full",{}],["asrkf-main","asrkf",{"_thread":false}],["asrkf-thread","asrkf",{"_overlap":false}],'
V+='["asrkf","asrkf",{}],["asrkf-spin50","asrkf",{"_spin_ns":50000000}]]'
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 16384 \
  --variants "$V" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *16384 " "$OUT/16k.log"

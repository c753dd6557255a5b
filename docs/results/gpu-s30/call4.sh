#!/bin/bash
# thirtieth session, fourth call: where asrkf's host time outside the policy's timers goes on a GPU host (0.19 ms a
# 16k token against full's 0.03 in call3): gpu_breakdown's hooks now also time the whole Runner.decode, Session.feed,
# the cell mirror's decode, the capture's reset/check and the tracker's flush. 16k, 256 tokens, full and asrkf, 2 runs.
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
V='[["full","full",{}],["asrkf","asrkf",{}]]'
PYTHONPATH=/tmp/site:. timeout $(( 560 - $(el) )) python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --decode 256 --hooks --runs 2 --lengths 16384 --variants "$V" --json "$OUT/16k.json" > "$OUT/16k.log" 2>&1
echo "16k done at $(el) s"; grep -E "^ *16384 |^label|Runner|Session.feed|CellMap|Capture|flush|make_room|after_logits|observe|after_decode" "$OUT/16k.log" | cut -c1-120

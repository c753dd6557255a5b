#!/bin/bash
# thirtieth session, third call (the second call's machine still warm: no build): 16k over 5 runs and 4k over 3,
# full and asrkf, 256-token replies, without --hooks (their timers cost the policy about 0.1 ms a token).
export PYTHONUNBUFFERED=1; B="python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf --decode 256"; V='[["full","full",{}],["asrkf","asrkf",{}]]'; PYTHONPATH=/tmp/site:. timeout 330 $B --runs 5 --lengths 16384 --variants "$V" --json "$OUT/16k-5.json" > "$OUT/16k-5.log" 2>&1; grep -E "^ *16384 " "$OUT/16k-5.log"; PYTHONPATH=/tmp/site:. timeout 200 $B --runs 3 --lengths 4096 --variants "$V" --json "$OUT/4k.json" > "$OUT/4k.log" 2>&1; grep -E "^ *4096 " "$OUT/4k.log"

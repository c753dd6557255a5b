#!/bin/bash
# thirty-second session, second call: the prompt read before (7398199, the thirty-first session's final code, in
# .gpu/old) and after this session's changes (mirror faulted in ahead, keys read back from the cache), 16k, 3 runs
# each in its own process, one after the other on one host; then this tree's 4k and 32k bars (3 runs) as time allows.
# carry [".gpu/kit", ".gpu/old"].
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_prepare.sh .gpu/old | tee "$OUT/build.log" || exit 1
echo "model at $(el) s"
V='[["full","full",{}],["asrkf","asrkf",{}]]'
A="/tmp/m/llama8b.gguf --decode 256 --runs 3"
PYTHONPATH=/tmp/site:. timeout $(( 470 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 16384 --variants "$V" \
  --json "$OUT/16k-new.json" > "$OUT/16k-new.log" 2>&1
echo "16k new done at $(el) s"; grep -E "^ *16384 " "$OUT/16k-new.log"
PYTHONPATH=/tmp/site:.gpu/old timeout $(( 530 - $(el) )) python3 .gpu/old/benchmarks/gpu_breakdown.py $A --lengths 16384 \
  --variants '[["asrkf-7398199","asrkf",{}]]' --json "$OUT/16k-old.json" > "$OUT/16k-old.log" 2>&1
echo "16k old done at $(el) s"; grep -E "^ *16384 " "$OUT/16k-old.log"
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) python3 benchmarks/gpu_breakdown.py $A --lengths 32768 4096 --variants "$V" \
  --json "$OUT/4k-32k.json" > "$OUT/4k-32k.log" 2>&1
echo "4k, 32k done at $(el) s"; grep -E "^ *(4096|32768) |^label" "$OUT/4k-32k.log" | cut -c1-150

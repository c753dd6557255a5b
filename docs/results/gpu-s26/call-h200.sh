#!/bin/bash
# one call: build, the 8B model; freeze/thaw of 05a90b0 and this tree in turn (twice); nothing else
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_build.sh .gpu/t05 2>&1 | tail -4 | tee "$OUT/build.log" || exit 1
mkdir -p /tmp/m
test -f /tmp/m/llama8b.gguf || PYTHONPATH=/tmp/site python3 benchmarks/gpu_make_model.py /tmp/m/llama8b.gguf | tail -1
echo "model at $(el) s"
for r in 1 2; do for T in .gpu/t05 .; do
  echo "== ft $T $r at $(el) s"
  PYTHONPATH=/tmp/site:$T timeout 60 python3 docs/results/gpu-s25/ft_ab.py /tmp/m/llama8b.gguf default > "$OUT/ft-$(basename $T)-$r.txt" 2>&1
  tail -c 400 "$OUT/ft-$(basename $T)-$r.txt" | tr -d ' \n'; echo
done; done

#!/bin/bash
# one call: build, the 8B model, decode at 16k (this tree: full, streaming, asrkf; then 5125a86's asrkf), then this
# tree's freeze/thaw with whatever time is left
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
bash benchmarks/gpu_build.sh .gpu/old 2>&1 | tail -4 | tee "$OUT/build.log" || exit 1
mkdir -p /tmp/m
test -f /tmp/m/llama8b.gguf || PYTHONPATH=/tmp/site python3 benchmarks/gpu_make_model.py /tmp/m/llama8b.gguf | tail -1
echo "model at $(el) s"
V='[["full","full",{}],["streaming","streaming",{}],["asrkf","asrkf",{}]]'
PYTHONPATH=/tmp/site:. timeout $(( 440 - $(el) )) python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf \
  --lengths 16384 --runs 3 --decode 64 --hooks --variants "$V" --json "$OUT/b8-16k-new.json" > "$OUT/b8-16k-new.log" 2>&1
echo "new done at $(el) s"; tail -4 "$OUT/b8-16k-new.log"
PYTHONPATH=/tmp/site:.gpu/old timeout $(( 530 - $(el) )) python3 benchmarks/gpu_breakdown.py /tmp/m/llama8b.gguf \
  --lengths 16384 --runs 3 --decode 64 --hooks --variants '[["asrkf-5125a86","asrkf",{}]]' --json "$OUT/b8-16k-old.json" > "$OUT/b8-16k-old.log" 2>&1
echo "old done at $(el) s"; tail -2 "$OUT/b8-16k-old.log"
PYTHONPATH=/tmp/site:. timeout $(( 590 - $(el) )) python3 docs/results/gpu-s25/ft_ab.py /tmp/m/llama8b.gguf default > "$OUT/ft-new.txt" 2>&1
echo "ft done at $(el) s"; tail -6 "$OUT/ft-new.txt"

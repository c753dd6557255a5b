#!/bin/bash
# The standard GPU measurement of issue 15 in calls of `device` (one warm H200, carry [".gpu/kit", TREES...]):
#   bash benchmarks/gpu_session.sh 1 [TREE...]   build (gpu_build.sh, ~270 s on a cold machine), then the default
#                                                shape's breakdown at 4k / 16k / 32k (full, asrkf, asrkf without
#                                                the recovery trigger; 3 runs, 128 tokens)
#   bash benchmarks/gpu_session.sh 2 [TREE...]   the 8B shape (written in ~20 s): freeze/thaw GB/s (400-token
#                                                ranges, 60-token scattered swaps; the head's also with freezes
#                                                gathered on the device), what a gather on the device
#                                                would buy (benchmarks/device_gather.py), the entropy's cost on
#                                                128k logits, then its breakdown (full, asrkf)
# TREEs (e.g. `git archive OLD asrkf_edge setup.py native pyproject.toml` under .gpu/) run the same measurements
# after this tree in the same call: before and after on one machine. The breakdowns share what is left of ~590 s;
# the head's also time each main call of the policy path (--hooks). Logs go to $OUT. The eleventh and twelfth
# sessions' calls, written out (docs/gpu.md).
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( 590 - ($(date +%s) - T0) )); }
name() { if [ "$1" = . ]; then echo head; else basename "$1"; fi; }
part=$1; shift
bash benchmarks/gpu_build.sh "$@" 2>&1 | tee -a "$OUT/build.log" || exit 1  # a warm machine keeps the wheel
mkdir -p /tmp/m
test -f /tmp/m/small.gguf || PYTHONPATH=/tmp/site python3 benchmarks/gpu_make_model.py /tmp/m/small.gguf \
  --layers 30 --embd 576 --heads 9 --kv-heads 3 --ff 1536 --vocab 49152 | tail -1
if [ "$part" = 1 ]; then
  M=small DECODE=128 VARIANTS='[["full","full",{}],["asrkf","asrkf",{}],["notrig","asrkf",{"trigger":"none"}]]'
else
  test -f /tmp/m/llama8b.gguf || PYTHONPATH=/tmp/site python3 benchmarks/gpu_make_model.py /tmp/m/llama8b.gguf | tail -1
  M=llama8b DECODE=64 VARIANTS='[["full","full",{}],["asrkf","asrkf",{}]]'
  for T in . "$@"; do
    more=(); [ "$T" = . ] && more=("--gather --repeat 10" "--gather --scattered 60 --repeat 30")  # freezes gathered
    for A in "--repeat 10" "--scattered 60 --repeat 30" "${more[@]}"; do
      echo "== freeze_thaw $(name "$T") $A"
      # shellcheck disable=SC2086  # $A is several arguments
      PYTHONPATH=/tmp/site:$T timeout 60 python3 benchmarks/freeze_thaw.py --flash-attn --gpu-layers -1 \
        --model /tmp/m/$M.gguf $A 2>/dev/null | tr -d '\n ' | tee -a "$OUT/freeze-thaw-$M.log"
      echo | tee -a "$OUT/freeze-thaw-$M.log"
    done
  done
  for C in 8 60; do
    PYTHONPATH=/tmp/site:. timeout 60 python3 benchmarks/device_gather.py --model /tmp/m/$M.gguf --gpu-layers -1 \
      --cells $C 2>/dev/null | tee -a "$OUT/device-gather-$M.log"
  done
  PYTHONPATH=/tmp/site:. python3 -c "import timeit, numpy as np; from asrkf_edge.importance import entropy; \
x = (np.random.default_rng(0).standard_normal(128256) * 3).astype(np.float32); \
print('entropy of 128k logits, ms:', min(timeit.repeat(lambda: entropy(x), number=200, repeat=5)) / 200 * 1e3)" \
    | tee -a "$OUT/entropy.log"
fi
trees=(. "$@")
for i in "${!trees[@]}"; do
  T=${trees[$i]}
  share=$(( $(left) / (${#trees[@]} - i) ))
  echo "== breakdown $(name "$T"), $share s"
  hooks=""; [ "$T" = . ] && hooks=--hooks
  PYTHONPATH=/tmp/site:$T timeout "$share" python3 benchmarks/gpu_breakdown.py /tmp/m/$M.gguf --runs 3 $hooks \
    --decode $DECODE --variants "$VARIANTS" --json "$OUT/breakdown-$M-$(name "$T").json" 2>&1 \
    | grep -v "^llama\|^load\|^print_info" | tee "$OUT/breakdown-$M-$(name "$T").log"
done

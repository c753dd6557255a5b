#!/bin/bash
# On a `device` GPU, the start of a measuring call: the build of benchmarks/gpu_build.sh (this tree and any tree
# given) and the random LLaMA-3-8B-shaped model at /tmp/m/llama8b.gguf (kept by a warm machine).
set -eo pipefail
bash benchmarks/gpu_build.sh "$@" 2>&1 | tail -4
mkdir -p /tmp/m
test -f /tmp/m/llama8b.gguf || PYTHONPATH=/tmp/site python3 benchmarks/gpu_make_model.py /tmp/m/llama8b.gguf | tail -1
echo "code $(bash benchmarks/code_print.sh)"

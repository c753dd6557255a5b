#!/bin/bash
# On a `device` H200 (carry .gpu/kit from benchmarks/gpu_kit.sh): llama-cpp-python with CUDA for sm_90 into
# /tmp/site (the recipe of docs/gpu.md, "Build"), and the native piece in place for the device's python3, in this
# tree and in any other tree given (e.g. a `git archive` of an older commit, to compare in the same call).
# Afterwards: export PYTHONPATH=/tmp/site:TREE. A warm machine (30 s after a call) keeps /tmp/site.
set -e
R=$PWD
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
t0=$(date +%s)
if [ ! -f /tmp/site/llama_cpp/__init__.py ]; then
  mkdir -p /tmp/site /tmp/bt && tar xJf .gpu/kit/site12.tar.xz -C /tmp/site
  python3 -m pip install -q --no-index --no-deps --target /tmp/bt .gpu/kit/bt/*.whl
  cd /tmp && tar xJf "$R/.gpu/kit/lcp.tar.xz" && cd llama_cpp_python-*
  PYTHONPATH=/tmp/bt CC=/usr/bin/gcc CXX=/usr/bin/g++ CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 \
-DGGML_OPENMP=OFF -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++ -DCMAKE_CXX_FLAGS=-fvisibility-inlines-hidden \
-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-Bsymbolic-functions" \
    python3 -m pip wheel -q --no-build-isolation --no-deps -w /tmp/wheel . > /tmp/wheel.log 2>&1 || { tail -40 /tmp/wheel.log; exit 1; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheel/*.whl
  echo "wheel built in $(( $(date +%s) - t0 )) s"
fi
cd "$R"
for d in . "$@"; do (cd "$d" && PYTHONPATH=/tmp/site python3 setup.py -q build_ext --inplace > /dev/null 2>&1 && ls "$PWD"/asrkf_edge/_native*.so); done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "ready in $(( $(date +%s) - t0 )) s"

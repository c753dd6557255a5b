#!/bin/bash
# Pack what a bare `device` H200 needs into .gpu/kit (git-ignored; 43 MB, under the 64 MiB a call may carry):
# llama-cpp-python's sdist trimmed to the CUDA and CPU backends (5 MB), and Numba, llvmlite (stripped), xxhash,
# gguf, click, diskcache for the device's Python 3.12 (its NumPy 2.5 is used), plus scikit-build-core to build.
# Then, in one `run` with carry [".gpu/kit"] (tracked files travel anyway): `bash benchmarks/gpu_build.sh` (about 5
# minutes).
set -e
VER=0.3.36
R=$(git rev-parse --show-toplevel)
K=$R/.gpu/kit
T=$(mktemp -d)
grep -qx '/.gpu/' "$R/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$R/.git/info/exclude"
mkdir -p "$K/bt"
pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$T"
tar xzf "$T/llama_cpp_python-$VER.tar.gz" -C "$T"
S=$T/llama_cpp_python-$VER
rm -rf "$S"/{.git,.github,examples,docker}
L=$S/vendor/llama.cpp
rm -rf "$L"/{models,docs,tests,benches,examples,media,pocs,conversion,gguf-py,app,skills,scripts,ci,.github,.devops}
(cd "$L/tools" && ls | grep -vx -e mtmd -e CMakeLists.txt | xargs rm -rf)
(cd "$L/ggml/src" && rm -rf ggml-{blas,cann,et,hexagon,hip,metal,musa,opencl,openvino,rpc,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn})
tar cf - -C "$T" "llama_cpp_python-$VER" | xz -9e > "$K/lcp.tar.xz"  # xz: the tree and the kit must fit the 64 MiB a device call carries
P="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: $P -d "$T/w" numba==0.68.1 llvmlite==0.50.0 xxhash==4.1.0
python3 -m pip download -q --no-deps -d "$T/w" gguf==0.19.0 click==8.5.1 diskcache==5.6.3
python3 -m pip install -q --no-deps --no-compile --target "$T/site" $P --only-binary=:all: "$T"/w/*.whl
strip --strip-unneeded "$T/site/llvmlite/binding/libllvmlite.so"
rm -rf "$T/site/numba/tests"  # Numba's own tests: with -9e the kit 41.7 -> 39.5 MB, room for the tree's growth
tar cf - -C "$T/site" . | xz -T2 -9e > "$K/site12.tar.xz"
python3 -m pip download -q --no-deps -d "$K/bt" scikit-build-core pathspec
rm -rf "$T"
du -sh "$K"

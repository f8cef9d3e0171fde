#!/usr/bin/env bash
# Builds llama.cpp's llama-server, ggml-rpc-server, llama-bench and llama-batched-bench from the sources
# vendored in the PyPI sdist of llama-cpp-python, cached outside the repository. Benchmarks only: the
# tests and `make up` never need it. ~15 min on 2 cores; a second run finds the cache and exits.
# SIMD flags are explicit, read from /proc/cpuinfo: GGML_NATIVE=ON also turns on AMX where the CPU
# flags it, and AMX faults in these VMs (llama-bench dies with SIGILL). AMX stays off.
# LLAMA_CPP_TARGETS (default: the four above) and LLAMA_CPP_CMAKE_EXTRA (more cmake flags, split
# into words) let scripts/device_threads.sh build llama-bench alone from a trimmed copy of the
# sources; LLAMA_CPP_SOURCES_ONLY=1 only fetches and unpacks them.
set -euo pipefail
VERSION=0.3.36
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/pipeserve/llamacpp}
SRC=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp
BIN=$SRC/build/bin
TARGETS=${LLAMA_CPP_TARGETS:-llama-server ggml-rpc-server llama-bench llama-batched-bench}
[ -n "${TARGETS// /}" ] || { echo "LLAMA_CPP_TARGETS names no target" >&2; exit 2; }
built=1
for t in $TARGETS; do [ -x "$BIN/$t" ] || built=0; done
if [ "$built" = 1 ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$CACHE"
cd "$CACHE"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  [ -f "llama_cpp_python-$VERSION.tar.gz" ] || python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
if [ -n "${LLAMA_CPP_SOURCES_ONLY:-}" ]; then  # the sources, unbuilt (scripts/device_threads.sh prepare)
  echo "$SRC"
  exit 0
fi
cd "$SRC"
flag() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
AVX512=$(flag avx512f); [ "$(flag avx512bw)" = ON ] || AVX512=OFF
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON \
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512="$AVX512" -DGGML_AVX512_VBMI="$(flag avx512vbmi)" \
  -DGGML_AVX512_VNNI="$(flag avx512_vnni)" -DGGML_AVX512_BF16="$(flag avx512_bf16)" -DGGML_AVX_VNNI="$(flag avx_vnni)" \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON \
  ${LLAMA_CPP_CMAKE_EXTRA:-} >&2  # (unquoted on purpose: several flags)
# shellcheck disable=SC2086  # the targets are words
cmake --build build -j"$(nproc)" --target $TARGETS >&2
echo "$BIN"

#!/usr/bin/env bash
# Issue 23's thread scaling on the lent 16-core machine (the `device` tool; nothing needs it): our
# engine against llama-bench and llama-batched-bench at 1, 2, 4, 8 and 16 threads, on the layout of
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (`pipeserve synth --spec qwen2.5-coder-1.5b --no-tokenizer`:
# the real file's tensors, shapes and types with random weights, written there; the real GGUF
# cannot travel), the same file for both engines. Two steps:
#
#   bash scripts/device_threads.sh prepare   # here: llama.cpp's sources, trimmed, into .devcache/
#   device run, carry [".devcache"], timeout_s 600:
#     bash scripts/device_threads.sh run
#
# `run` builds the kernels with the machine's python3 (its numpy; the engine imports nothing
# else), llama-bench and llama-batched-bench with explicit SIMD flags (no AMX), writes the model,
# then runs scripts/bench_engine.py (which also probes read bandwidth and FMA peak per thread
# count), writing $OUT/engine-threads.json and logs. THREADS / TOKENS / RUNS override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/pipeserve/llamacpp}
TGZ=.devcache/llama-src.tgz

case "${1:-}" in
prepare)
  bash scripts/build_llamacpp.sh >/dev/null  # the sdist's sources (and a build here, for benchmarks)
  grep -qx '/.devcache/' .git/info/exclude 2>/dev/null || echo '/.devcache/' >>.git/info/exclude
  mkdir -p .devcache
  # What llama-bench and llama-batched-bench need: no models, docs, tests, UI or GPU backends.
  top="llama_cpp_python-$VERSION/vendor/llama.cpp"
  ex=()
  for d in build .git models docs tests examples tools/ui ggml/src/ggml-{cuda,metal,vulkan,sycl,opencl,hexagon,et,cann,musa,webgpu,zdnn}; do
    ex+=(--exclude="$top/$d")
  done
  tar czf "$TGZ" -C "$CACHE" --anchored "${ex[@]}" "$top"
  ls -l "$TGZ"
  ;;
run)
  : "${OUT:?run on the device machine, where OUT is set}"
  export PYTHONUNBUFFERED=1 LLAMA_CPP_CACHE=/tmp/llamacpp
  export LLAMA_CPP_TARGETS="llama-bench llama-batched-bench"
  export LLAMA_CPP_CMAKE_EXTRA="-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
  { nproc; lscpu; python3 --version; } >"$OUT/machine.txt" 2>&1 || true
  mkdir -p "$LLAMA_CPP_CACHE" && tar xzf "$TGZ" -C "$LLAMA_CPP_CACHE"
  # llama.cpp builds in the background while the kernels build here
  (bash scripts/build_llamacpp.sh >"$OUT/llama-build.log" 2>&1; echo "exit $?" >>"$OUT/llama-build.log") &
  python3 setup.py -q build_ext --inplace --parallel "$(nproc)" >"$OUT/kernels-build.log" 2>&1
  mkdir -p /tmp/pkg && ln -sfn "$PWD/src" /tmp/pkg/pipeserve
  export PYTHONPATH=/tmp/pkg
  python3 -m pipeserve.cli synth --spec qwen2.5-coder-1.5b --out /tmp/qwen-synth.gguf --no-tokenizer 2>/dev/null
  wait
  tail -n 1 "$OUT/llama-build.log"
  python3 scripts/bench_engine.py --model /tmp/qwen-synth.gguf --threads "${THREADS:-1,2,4,8,16}" \
    --tokens "${TOKENS:-16}" --runs "${RUNS:-2}" --out "$OUT/engine-threads.json" 2>&1 | tee "$OUT/bench.log"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac

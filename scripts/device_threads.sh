#!/usr/bin/env bash
# Issue 23's thread scaling on the lent 16-core machine (the `device` tool; nothing needs it): our
# engine against llama-bench and llama-batched-bench at 16, 8, 4, 2 and 1 threads (the figure the
# issue asks for first, in case the 600 s limit cuts the run), on the layout of
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (`pipeserve synth --spec qwen2.5-coder-1.5b --no-tokenizer`:
# the real file's tensors, shapes and types with random weights, written there; the real GGUF
# cannot travel), the same file for both engines. Two steps:
#
#   bash scripts/device_threads.sh prepare   # here: llama.cpp's sources, trimmed, into .devcache/
#   device run, carry [".devcache"], timeout_s 600:
#     bash scripts/device_threads.sh run
#
# `run` builds the kernels with the machine's python3 (its numpy; the engine needs only the
# `gguf` package besides, carried as a wheel), llama-bench and llama-batched-bench with explicit SIMD flags (no AMX), writes the model,
# then runs scripts/bench_engine.py (which also probes read bandwidth and FMA peak per thread
# count), writing $OUT/engine-threads.json (after each thread count, so a run stopped at its
# limit still returns what it measured) and logs. THREADS / TOKENS / RUNS override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/pipeserve/llamacpp}
TGZ=.devcache/llama-src.tgz

case "${1:-}" in
prepare)
  LLAMA_CPP_SOURCES_ONLY=1 bash scripts/build_llamacpp.sh >/dev/null  # the sdist's sources
  grep -qx '/.devcache/' .git/info/exclude 2>/dev/null || echo '/.devcache/' >>.git/info/exclude
  mkdir -p .devcache
  # What llama-bench and llama-batched-bench need: no models, docs, tests, UI or GPU backends.
  top="llama_cpp_python-$VERSION/vendor/llama.cpp"
  ex=()
  for d in build .git models docs tests examples tools/ui ggml/src/ggml-{cuda,metal,vulkan,sycl,opencl,hexagon,et,cann,musa,webgpu,zdnn}; do
    ex+=(--exclude="$top/$d")
  done
  tar czf "$TGZ" -C "$CACHE" --anchored "${ex[@]}" "$top"
  # the one package the engine needs there besides numpy (pure Python; that machine has no registry)
  rm -rf .devcache/whl && .venv/bin/python -m pip download -q --no-deps -d .devcache/whl \
    "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  ls .devcache/whl
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
  (
    set +e
    bash scripts/build_llamacpp.sh >"$OUT/llama-build.log" 2>&1
    echo "exit $?" >>"$OUT/llama-build.log"
  ) &
  llama=$!
  if ! python3 setup.py -q build_ext --inplace --parallel "$(nproc)" >"$OUT/kernels-build.log" 2>&1; then
    tail -n 30 "$OUT/kernels-build.log"
    kill "$llama" 2>/dev/null || true
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcache/whl/*.whl
  mkdir -p /tmp/pkg && ln -sfn "$PWD/src" /tmp/pkg/pipeserve
  export PYTHONPATH=/tmp/pkg:/tmp/site
  python3 -m pipeserve.cli synth --spec qwen2.5-coder-1.5b --out /tmp/qwen-synth.gguf --no-tokenizer \
    2>"$OUT/synth.log"
  wait "$llama" || true
  if [ "$(tail -n 1 "$OUT/llama-build.log")" != "exit 0" ]; then  # no anchor: not worth the device's time
    tail -n 30 "$OUT/llama-build.log"
    exit 1
  fi
  python3 scripts/bench_engine.py --model /tmp/qwen-synth.gguf --threads "${THREADS:-16,8,4,2,1}" \
    --tokens "${TOKENS:-16}" --runs "${RUNS:-2}" --out "$OUT/engine-threads.json" 2>&1 | tee "$OUT/bench.log"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac

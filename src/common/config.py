"""The one typed configuration, loaded from src/config/config.json and validated at start-up.

Every service reads it (`load_config`). The file keeps the spec's format (`model_name`,
`nodes[{id, address, model_part}]`); every other field is optional and documented here.
A few PIPESERVE_* environment variables override it (common/env.py lists them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeserve.common import env
from pipeserve.common.errors import ConfigError
from pipeserve.common.memory import MemorySetting, parse_bytes
from pipeserve.common.shard import Shard
from pipeserve.common.threads import MAX_THREADS, ThreadsSetting

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Address = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+:\d{1,5}$", description="host:port")]


def _threads(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_THREADS:
        return value
    raise ValueError(f"must be 'auto' or a whole number from 1 to {MAX_THREADS}, got {value!r}")


# "auto" (the node's cores divided among the nodes computing on them at once) or a fixed number.
Threads = Annotated[ThreadsSetting, BeforeValidator(_threads)]


def _memory(value: Any) -> Any:
    return value if value == "auto" else parse_bytes(value)


# "auto" (the node's cgroup limit, else the machine's available memory) or bytes ("6GiB", 6442450944).
MemoryLimitSetting = Annotated[MemorySetting, BeforeValidator(_memory)]


def _cache_tokens(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"must be 'auto' or a whole number of tokens >= 1, got {value!r}")


# "auto" (the KV pool takes what is left under the node's memory limit) or a number of positions.
CacheTokens = Annotated[Literal["auto"] | int, BeforeValidator(_cache_tokens)]


class NodeConfig(_Strict):
    id: str = Field(min_length=1, description="Unique node name, e.g. node1.")
    address: Address = Field(description="host:port where the coordinator reaches this node's gRPC server.")
    model_part: int = Field(ge=0, description="Which part of the model this node serves (0 = first stage).")
    layers: tuple[int, int] | None = Field(
        None,
        description="Explicit half-open layer range [start, end); default: an even split over the parts.",
    )
    threads: Threads | None = Field(
        None,
        description="Native-kernel threads for this node, 'auto' or a number (default node_defaults.threads).",
    )
    cache_budget_tokens: CacheTokens | None = Field(
        None, description="Override of node_defaults.cache_budget_tokens: 'auto' or a number of positions."
    )
    memory_limit: MemoryLimitSetting | None = Field(
        None,
        description="Override of node_defaults.memory_limit for this node: 'auto', bytes, or a size such as '6GiB'.",
    )
    lossy_int8: bool | None = Field(None, description="Override of node_defaults.lossy_int8 for this node.")
    kv_dtype: KvDtype | None = Field(None, description="Override of node_defaults.kv_dtype for this node.")


KvDtype = Literal["f32", "f16", "bf16", "q8_0"]


class NodeDefaults(_Strict):
    cache_budget_tokens: CacheTokens = Field(
        "auto",
        description="KV-cache positions a node holds over all requests (its block pool, allocated at start). "
        "'auto': 90% of what is left under the node's memory_limit after its share's weights and the runtime "
        "allowance, at most 32768 and at least coordinator.max_batch_tokens (common/memory.py); a number is "
        "used as given, and a node whose weights + that pool + the runtime exceed its limit refuses to load.",
    )
    memory_limit: MemoryLimitSetting = Field(
        "auto",
        description="Bytes a node may use (a number, or a size: '6GiB', '512MiB', '6Gi'; '2GB' is 2e9). Before "
        "mapping any weight a node checks that its share (weights from the file's header + its KV pool + a "
        "runtime allowance) fits and refuses with the numbers otherwise; `layers: auto` places within the "
        "limits. 'auto': the memory cgroup's limit (v2 memory.max / v1 memory.limit_in_bytes) when one applies "
        "to the node's process, else the machine's available memory divided among the nodes the config puts "
        "on its host.",
    )
    cache_ttl_s: float = Field(
        600.0,
        gt=0,
        description="Idle caches are evicted after this many seconds; free KV blocks unused that long are forgotten and their pages handed back to the OS.",
    )
    threads: Threads = Field(
        "auto",
        description="Native-kernel threads per node process; every op of a forward runs on them. 'auto': the "
        "cores the node's process may use (affinity, cgroup quota) divided among the nodes of the cluster that "
        "compute on that host at the same time (src/common/threads.py); a number fixes it.",
    )
    max_message_mb: int = Field(64, ge=1, description="Largest gRPC message a node accepts or sends, MiB.")
    lossy_int8: bool = Field(
        False,
        description="Opt-in lossy fast mode for this node's matmuls: activations rounded to int8 (a scale per 32 "
        "values) and dotted with the Q4_K / Q6_K / Q4_1 weight blocks in integers (VNNI where the CPU has it), "
        "as llama.cpp does: ~2.5x faster prefill on Qwen2.5-Coder-1.5B, outputs close to the exact path's but "
        "not equal (README: quality figures). Other weight types stay exact. Off (the default): every matmul "
        "takes fp32 activations, equal to transformers up to summation order.",
    )
    batch_invariant: bool = Field(
        False,
        description="Deterministic results whatever the batch: every node computes each token's matmuls "
        "as it would alone, so a request's logits (and its greedy text, and its seeded samples) do not "
        "depend on the requests it shared steps with, on how its prompt was chunked, on the prefix cache "
        "or on a failover replay, for every KV type (q8_0 included). vLLM's VLLM_BATCH_INVARIANT, SGLang's "
        "deterministic inference. Costs prefill and large batches (docs/engine.md: batch-invariant mode). Off: "
        "exact up to summation order, and a token's last bits depend on its batch.",
    )
    kv_dtype: KvDtype = Field(
        "f32",
        description="Element type of the node's KV cache: 'f32' (the default, the exact reference), 'f16' or "
        "'bf16' (half the bytes per position: an 'auto' pool holds twice the positions in the same memory; "
        "rows are rounded to nearest even when written, attention runs in fp32; llama.cpp's -ctk/-ctv, "
        "vLLM's kv_cache_dtype), or 'q8_0' (ggml's Q8_0 blocks: 34 bytes per 32 elements, 0.28x of f32; "
        "rows quantized when written, read back as fp32 numbers; head_dim must be a multiple of 32, else the "
        "node refuses to load, naming both).",
    )


MAX_DRAFT = 7
"""A speculative step verifies a stream's token and at most this many drafts: up to 8 rows per
matmul the kernels compute every row exactly as alone (kernels/qk_types.h, MV_PASS_MAX_T), so the
output is identical with and without speculation."""


class SpeculativeConfig(_Strict):
    method: Literal["ngram", "off"] = Field(
        "ngram",
        description="Drafts for speculative decoding: `ngram` proposes the tokens that followed the "
        "stream's last few tokens where they occurred before in its prompt or output (prompt lookup; "
        "no second model); `off` never drafts. Output is identical either way.",
    )
    max_draft: int = Field(
        MAX_DRAFT,
        ge=0,
        le=MAX_DRAFT,
        description="Drafts a stream may send in one step at most; each request adapts its own number "
        "to its measured acceptance and the step's measured cost (0 = off). A step carries drafts only "
        f"while it has at most {MAX_DRAFT + 1} rows in all, so busy batches never draft.",
    )


class CoordinatorConfig(_Strict):
    address: Address = Field("127.0.0.1:50050", description="host:port of the coordinator's gRPC server.")
    max_running: int = Field(32, ge=1, description="Requests decoding at once (the continuous batch).")
    max_waiting: int = Field(64, ge=0, description="Requests queued beyond max_running; more get 429.")
    prefix_cache: bool = Field(
        True,
        description="Start a request's prefill on the KV blocks of its prefix that every stage of its route "
        "already holds (shared, not copied), and route it to the replica that holds them.",
    )
    micro_batches: int = Field(
        0,
        ge=0,
        description="Groups in flight through the pipeline; 0 = auto: one when every node runs on one host "
        "(its stages take turns on all its cores), one per part when the nodes are on several hosts.",
    )
    max_batch_tokens: int = Field(
        256, ge=1, description="Tokens per forward step (prefill chunks + decodes)."
    )
    prefill_chunk_tokens: int = Field(
        64,
        ge=1,
        description="Prefill tokens per step while other requests decode (bounds inter-token latency).",
    )
    health_interval_s: float = Field(1.0, gt=0, description="How often each node's health is checked.")
    recovery_wait_s: float = Field(
        3.0, ge=0, description="How long queued requests wait for a dead part to return."
    )
    forward_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one step: every request's result back from the chain."
    )
    rpc_timeout_s: float = Field(3.0, gt=0, description="Deadline of Info/Release/tokenizer RPCs.")
    max_retries: int = Field(
        3, ge=0, description="Retries of a failed step (with failover) before the request fails."
    )
    speculative: SpeculativeConfig = Field(
        default_factory=SpeculativeConfig,
        description="Speculative decoding: several tokens per pass through the pipeline, verified "
        "exactly (`{method: ngram|off, max_draft: N}`).",
    )
    join_token: str | None = Field(
        None,
        description="Shared secret a node must present to Join at run time. Without TLS, Join is refused "
        "unless this is set; with TLS (mTLS), the node's certificate admits it and a set token is checked too.",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "data_path" in data:
            raise ValueError(
                f"data_path ({data['data_path']!r}) was removed: the chain is the only data path; delete the key"
            )
        return data


class TokenizerConfig(_Strict):
    address: Address = Field("127.0.0.1:50054", description="host:port of the tokenizer's gRPC server.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template for chat requests; replaces the model's own. A model without one "
        "(a base model's GGUF) answers chat requests with 400 unless this is set.",
    )


class ApiConfig(_Strict):
    host: str = Field("0.0.0.0", description="Interface the REST API binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the REST API.")
    api_key: str | None = Field(
        None, description="When set, every endpoint but /health needs `Authorization: Bearer <key>`."
    )
    cors_origins: list[str] = Field(
        ["http://localhost:5173", "http://127.0.0.1:5173"],
        description="Origins allowed to call the API from a browser.",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    request_timeout_s: float = Field(
        300.0, gt=0, description="Deadline of one generation; past it the client gets 504."
    )
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request gives none.")


class TlsConfig(_Strict):
    enabled: bool = Field(
        False,
        description="TLS with client certificates (mTLS) on every gRPC link: API, coordinator, tokenizer, "
        "nodes. Each service presents its own certificate; only certificates signed by ca_file are accepted.",
    )
    ca_file: str = Field("certs/ca.crt", description="PEM of the cluster's CA (`make certs` creates one).")
    cert_file: str = Field(
        "certs/{name}.crt",
        description="PEM certificate of this service; {name} is the service's name: coordinator, tokenizer, "
        "api, or the node's id. Its subject names that service: peers check it.",
    )
    key_file: str = Field("certs/{name}.key", description="PEM private key of this service's certificate.")


class FrontendConfig(_Strict):
    port: int = Field(5173, ge=1, le=65535, description="Port `pipeserve up` serves the built UI on.")


class Config(_Strict):
    model_name: str = Field(
        "smollm2-135m-instruct",
        description="The embedded default, a .gguf file, a checkpoint folder, or a hub id (needs a network).",
    )
    nodes: list[NodeConfig] = Field(
        min_length=1, description="Model nodes; several may serve one part (replicas)."
    )
    max_context: int | None = Field(
        None, ge=1, description="Cap on prompt + generated tokens (default: the model's)."
    )
    layers: Literal["even", "auto"] = Field(
        "even",
        description="How parts split the model's layers when no node gives `layers`: even, or auto (each "
        "node measures its speed and reports its memory limit and the model's bytes per layer before "
        "loading; the coordinator splits in proportion to speed within every node's memory_limit, or "
        "refuses the cluster naming the shortfall and the smallest fix).",
    )
    wire_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32",
        description="How hidden states travel between stages: fp32 is exact (greedy output equals a "
        "single process); fp16/bf16 halve the bytes per hop and round the activations at every hop.",
    )
    node_defaults: NodeDefaults = NodeDefaults()
    coordinator: CoordinatorConfig = CoordinatorConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    api: ApiConfig = ApiConfig()
    frontend: FrontendConfig = FrontendConfig()
    tls: TlsConfig = TlsConfig()
    log_level: str = Field("INFO", description="Python logging level of every service.")

    @model_validator(mode="after")
    def _check_nodes(self) -> Config:
        seen_ids: dict[str, int] = {}
        seen_addr: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.id in seen_ids:
                raise ValueError(f"nodes[{i}].id={n.id!r} repeats nodes[{seen_ids[n.id]}].id")
            if n.address in seen_addr:
                raise ValueError(
                    f"nodes[{i}].address={n.address!r} repeats nodes[{seen_addr[n.address]}].address"
                )
            seen_ids[n.id] = seen_addr[n.address] = i
        parts = sorted({n.model_part for n in self.nodes})
        if parts != list(range(len(parts))):
            missing = sorted(set(range(max(parts) + 1)) - set(parts))
            bad = next(i for i, n in enumerate(self.nodes) if n.model_part > len(parts) - 1)
            raise ValueError(
                f"nodes[{bad}].model_part={self.nodes[bad].model_part} but no node serves part(s) "
                f"{missing}: parts must be numbered 0..{len(parts) - 1} without gaps"
            )
        for part in parts:
            ranges = {n.layers for n in self.nodes if n.model_part == part}
            if len(ranges) > 1:
                raise ValueError(f"nodes of model_part={part} disagree on layers: {sorted(map(str, ranges))}")
        explicit = [n for n in self.nodes if n.layers is not None]
        if explicit and self.layers == "auto":
            i = self.nodes.index(explicit[0])
            raise ValueError(f"layers='auto' and nodes[{i}].layers are both given: auto places every part")
        if explicit and len(explicit) != len(self.nodes):
            i = next(i for i, n in enumerate(self.nodes) if n.layers is None)
            raise ValueError(f"nodes[{i}] has no layers but other nodes do: give every node layers, or none")
        if explicit:
            by_part = {n.model_part: n.layers for n in self.nodes}
            prev_end = 0
            for part in parts:
                start, end = by_part[part]  # type: ignore[misc]
                i = next(i for i, n in enumerate(self.nodes) if n.model_part == part)
                if start >= end:
                    raise ValueError(f"nodes[{i}].layers=[{start}, {end}) is empty")
                if start > prev_end:
                    raise ValueError(
                        f"nodes[{i}].layers starts at {start}: layers [{prev_end}, {start}) are served by no part (gap)"
                    )
                if start < prev_end:
                    raise ValueError(
                        f"nodes[{i}].layers=[{start}, {end}) overlaps the previous part, which ends at {prev_end}"
                    )
                prev_end = end
        return self

    @property
    def n_parts(self) -> int:
        return len({n.model_part for n in self.nodes})

    def node(self, node_id: str) -> NodeConfig:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ConfigError(f"no node with id {node_id!r} in the config (ids: {[n.id for n in self.nodes]})")

    def part_layers(self, part: int, n_layers: int) -> Shard:
        """Layers of a part: explicit, or part `part` of an even split."""
        n = next(n for n in self.nodes if n.model_part == part)
        if n.layers is not None:
            if n.layers[1] > n_layers or (part == self.n_parts - 1 and n.layers[1] != n_layers):
                raise ConfigError(
                    f"nodes[{self.nodes.index(n)}].layers={list(n.layers)} does not fit a model of {n_layers} layers"
                )
            return Shard(n.layers[0], n.layers[1], n_layers)
        if self.n_parts > n_layers:
            raise ConfigError(f"the config has {self.n_parts} parts but the model has only {n_layers} layers")
        return Shard.even(n_layers, self.n_parts, part)

    def with_loopback_hosts(self) -> Config:
        """The same config with every host replaced by 127.0.0.1 (for `pipeserve up` on one machine)."""

        def lo(addr: str) -> str:
            return "127.0.0.1:" + addr.rsplit(":", 1)[1]

        return self.model_copy(
            update={
                "nodes": [n.model_copy(update={"address": lo(n.address)}) for n in self.nodes],
                "coordinator": self.coordinator.model_copy(update={"address": lo(self.coordinator.address)}),
                "tokenizer": self.tokenizer.model_copy(update={"address": lo(self.tokenizer.address)}),
            }
        )


def load_config(path: str | Path | None = None) -> Config:
    path = Path(path or env.get("PIPESERVE_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return parse_config(raw, str(path))


def parse_config(raw: dict, origin: str = "config") -> Config:
    raw = _apply_env(dict(raw))
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: " + "; ".join(_describe(e, raw) for e in exc.errors())) from exc


def _describe(err: Any, raw: dict) -> str:
    loc = err["loc"]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") == "literal_error":  # a choice: name what was given too
        msg += f", got {err.get('input')!r}"
    where = ""
    if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
        try:
            where = f" (node {raw['nodes'][loc[1]].get('id', '?')!r})"
        except (IndexError, KeyError, AttributeError, TypeError):
            where = ""
    return f"{field}{where}: {msg}" if field else msg


def _apply_env(raw: dict) -> dict:
    """The PIPESERVE_* variables that override fields (common/env.py), over the file's values."""
    for field, value in env.overrides().items():
        section, _, key = field.rpartition(".")
        if section:
            raw[section] = {**raw.get(section, {}), key: value}
        else:
            raw[key] = value
    return raw

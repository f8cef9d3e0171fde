"""Request and response bodies of the REST API (pydantic), documented field by field: they are the
OpenAPI schema at /openapi.json. The spec's `POST /api/model/process`, the OpenAI-compatible
`/v1/*` endpoints, and the cluster view the frontend polls. Conversion to and from protobuf lives
in convert.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeserve.common.errors import Reason

UINT64_MAX = 2**64 - 1
MAX_TOKENS_LIMIT = 2**31 - 1  # GenerateRequest.max_tokens is a uint32; the context caps it anyway
MAX_TOP_LOGPROBS = 20  # what the engine returns at most (SamplingParams.top_logprobs)

FinishReason = Literal["stop", "length", "cancelled"]


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text is not valid Unicode at position {exc.start} (a lone surrogate)"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # what protobuf strings can carry
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


# ---- shared ------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    """OpenAI's error fields (message, type, code, param) and pipeserve's (status, part, node,
    retry_after_s). Every key is always present; a field that does not apply is null."""

    message: str = Field(description="What went wrong, naming the field or the part of the system.")
    type: str = Field(
        description="Error class, e.g. invalid_request_error, rate_limit_error, service_unavailable."
    )
    code: Reason = Field(
        description="Machine-readable reason (the same set in gRPC status details): what a client acts on."
    )
    param: str | None = Field(
        description="The request body's field the error concerns (dotted path, e.g. `metadata.type`)."
    )
    status: int = Field(
        description="The HTTP status (also inside SSE error events, where there is no status)."
    )
    part: int | None = Field(description="The model part (pipeline stage, 0 = first) that failed.")
    node: str | None = Field(
        description="The node that failed; comma-separated when every replica of `part` is down."
    )
    retry_after_s: int | None = Field(
        description="Seconds to wait before retrying (equals the Retry-After header); null when retrying "
        "will not help."
    )


class ErrorBody(BaseModel):
    """The one error body of every endpoint (also sent as an SSE `data:` event mid-stream)."""

    error: ErrorDetail


class SamplingFields(BaseModel):
    """Sampling controls shared by every generation endpoint."""

    max_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS_LIMIT,
        description="Tokens to generate at most (default: api.default_max_tokens).",
    )
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set with this mass; 1 = off."
    )
    top_k: int = Field(0, ge=0, le=1_000_000, description="Keep only the k most likely tokens; 0 = off.")
    min_p: float = Field(
        0.0, ge=0, le=1, description="Drop tokens below min_p x the top probability; 0 = off."
    )
    repetition_penalty: float = Field(
        1.0, gt=0, le=10, description="Divide logits of tokens already seen (HF style); 1 = off."
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI presence penalty; 0 = off.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI frequency penalty; 0 = off.")
    seed: int | None = Field(
        None, ge=0, le=UINT64_MAX, description="Same seed, same prompt and parameters => same tokens."
    )
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = Field(
        None,
        description="Stop string(s), at most 16; generation ends before them (not included in the text).",
    )
    ignore_eos: bool = Field(
        False, description="Keep generating past the end-of-sequence token (benchmarks)."
    )
    speculative: bool | None = Field(
        None,
        description="false: never send drafts for this request (speculative decoding; the output is the "
        "same either way). Unset: the coordinator's `speculative` setting.",
    )


# ---- POST /api/model/process (the spec) ---------------------------------------------------------
class ProcessMetadata(BaseModel):
    timestamp: datetime | None = Field(
        None, description="ISO-8601 time the client sent the request (informational)."
    )
    type: Literal["text_generation", "chat"] = Field(
        "text_generation",
        description="text_generation: `text` is a plain prompt; chat: `text` is one user message, rendered with "
        "the model's chat template.",
    )


class ProcessRequest(SamplingFields):
    text: Text = Field(min_length=1, description="Input text to process.")
    metadata: ProcessMetadata = Field(default_factory=ProcessMetadata, description="Request metadata.")
    stream: bool = Field(False, description="Answer with Server-Sent Events instead of one JSON body.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "text": "Input text to process",
                    "metadata": {"timestamp": "2024-02-17T12:00:00Z", "type": "text_generation"},
                }
            ]
        }
    )


class ProcessResponse(BaseModel):
    text: str = Field(description="Generated text (the prompt is not repeated).")
    processingTime: float = Field(description="Time the API spent on the request, milliseconds.")
    nodeCount: int = Field(description="Pipeline stages the request went through (one node per model part).")


# ---- OpenAI-compatible /v1 ----------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = Field(
        False, description="Send a last chunk with empty choices and the usage, as OpenAI does."
    )


class RouteHop(BaseModel):
    part: int = Field(description="Model part (pipeline stage), 0 = first.")
    node_id: str = Field(description="Node that served the part.")
    address: str = Field(description="host:port of that node.")


class StageTiming(BaseModel):
    part: int = Field(description="Model part.")
    node_id: str = Field(description="Node that served it (the last one if the request failed over).")
    forward_ms: float = Field(description="Compute time on the node over the whole request, milliseconds.")
    hop_ms: float = Field(description="RPC time minus compute (transfer + queueing), milliseconds.")
    bytes_sent: int = Field(description="Bytes of Forward requests sent to this stage.")


class SpeculativeView(BaseModel):
    """Speculative decoding's counts: several tokens per pass through the pipeline."""

    drafted: int = Field(description="Draft tokens sent to be verified.")
    accepted: int = Field(description="Drafts the model agreed with (each saves a pass).")
    acceptance_rate: float = Field(description="accepted / drafted (0 when nothing was drafted).")
    passes: int = Field(description="Passes through the pipeline that gave tokens.")
    tokens_per_pass: float = Field(description="Tokens those passes gave, per pass (1.0 without drafts).")


class PipeserveInfo(BaseModel):
    """pipeserve's extension: how the request went through the pipeline."""

    request_id: str = Field(description="The id the coordinator logged the request under.")
    route: list[RouteHop] = Field(description="Which node served each part, in pipeline order.")
    ttft_ms: float = Field(description="Time to first token from arrival at the coordinator, milliseconds.")
    total_ms: float = Field(description="Arrival at the coordinator to finish, milliseconds.")
    queue_ms: float = Field(description="Time waiting for admission, milliseconds.")
    failovers: int = Field(description="Times the request was replayed on another node.")
    stage_timings: list[StageTiming] = Field(description="Per-stage compute, transfer time and bytes.")
    speculative: SpeculativeView = Field(description="This request's drafts and tokens per pass.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt (after the chat template).")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class CompletionRequest(SamplingFields):
    model: str | None = Field(None, description="Ignored: the cluster serves one model (see GET /v1/models).")
    prompt: Text | list[TokenId] | list[Text] = Field(
        description="Prompt text, or its token ids, or a list holding exactly one prompt text."
    )
    n: int = Field(1, ge=1, le=1, description="Choices to generate; only 1 is supported.")
    stream: bool = Field(
        False, description="Stream chunks as Server-Sent Events, ending with `data: [DONE]`."
    )
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Return the chosen tokens' logprobs and this many alternatives.",
    )
    user: str | None = Field(None, description="Ignored (OpenAI compatibility).")


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: Text = Field(description="The text.")


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who speaks; developer is read as system."
    )
    content: Text | list[TextPart] | None = Field(description="The turn's text (text parts are joined).")


class ChatCompletionRequest(SamplingFields):
    model: str | None = Field(None, description="Ignored: the cluster serves one model (see GET /v1/models).")
    messages: list[ChatMessage] = Field(
        min_length=1, description="The conversation, rendered with the chat template."
    )
    n: int = Field(1, ge=1, le=1, description="Choices to generate; only 1 is supported.")
    stream: bool = Field(
        False, description="Stream chunks as Server-Sent Events, ending with `data: [DONE]`."
    )
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    logprobs: bool = Field(False, description="Return the chosen tokens' logprobs.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token (needs logprobs: true)."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_LIMIT, description="Alias of max_tokens (newer OpenAI clients)."
    )
    user: str | None = Field(None, description="Ignored (OpenAI compatibility).")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="Each generated token's text.")
    token_logprobs: list[float] = Field(description="Natural-log probability of each generated token.")
    top_logprobs: list[dict[str, float]] | None = Field(
        description="Per token: alternatives' text -> logprob."
    )
    text_offset: list[int] = Field(description="Character offset of each token in the completion text.")


class CompletionChoice(BaseModel):
    index: int = Field(0, description="Always 0 (n = 1).")
    text: str = Field(description="Generated text (a streamed chunk: the new text).")
    finish_reason: FinishReason | None = Field(
        description="stop (EOS or a stop string), length (max_tokens/context)."
    )
    logprobs: CompletionLogprobs | None = Field(None, description="When the request asked for logprobs.")


class CompletionResponse(BaseModel):
    id: str = Field(description="Request id.")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(description="Unix time, seconds.")
    model: str = Field(description="The served model.")
    choices: list[CompletionChoice]
    usage: Usage | None = None
    pipeserve: PipeserveInfo | None = Field(
        None, description="Pipeline route and timings (final chunk / response)."
    )


class TopLogprob(BaseModel):
    token: str = Field(description="Token text.")
    logprob: float = Field(description="Natural-log probability.")
    bytes: list[int] | None = Field(None, description="Not provided (null).")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The most likely alternatives at this position.")


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(description="One entry per generated token.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="Generated reply.")


class ChatChoice(BaseModel):
    index: int = Field(0, description="Always 0 (n = 1).")
    message: AssistantMessage
    finish_reason: FinishReason | None = Field(
        description="stop (EOS or a stop string), length (max_tokens/context)."
    )
    logprobs: ChatLogprobs | None = Field(None, description="When the request asked for logprobs.")


class ChatCompletionResponse(BaseModel):
    id: str = Field(description="Request id.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time, seconds.")
    model: str = Field(description="The served model.")
    choices: list[ChatChoice]
    usage: Usage
    pipeserve: PipeserveInfo | None = Field(None, description="Pipeline route and timings.")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="Set on the first chunk only.")
    content: str | None = Field(None, description="New text.")


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    pipeserve: PipeserveInfo | None = None


class ModelCard(BaseModel):
    id: str = Field(description="Model name.")
    object: Literal["model"] = "model"
    created: int = Field(0, description="Unix time the model was loaded (0: unknown).")
    owned_by: str = Field("pipeserve", description="Always pipeserve.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- health and the cluster view ----------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"] = Field("ok", description="The API process is up (says nothing about the cluster).")


class Ready(BaseModel):
    ready: Literal[True] = Field(True, description="Every part has a healthy node and the tokenizer serves.")


class ModelView(BaseModel):
    name: str = Field(description="Model name.")
    checksum: str = Field(description="Checksum every node and the tokenizer agree on ('' when unknown).")
    arch: str = Field(description="llama or gpt2 ('' when unknown).")
    n_layers: int = Field(description="Transformer layers in the whole model (0 when unknown).")


class CoordinatorView(BaseModel):
    address: str = Field(description="host:port of the coordinator.")
    healthy: bool = Field(description="The coordinator answered ClusterStatus.")
    running: int = Field(description="Requests in the continuous batch.")
    waiting: int = Field(description="Requests queued for admission.")
    max_running: int
    max_waiting: int
    micro_batches: int = Field(description="Groups in flight through the pipeline.")
    micro_batches_reason: str = Field(
        description="Why that many: 'set to 2 in the config', or auto's choice from where the nodes run, "
        "e.g. 'all 3 nodes on one host (by the host ids the nodes report): ...' ('' when unknown)."
    )
    speculative_method: str = Field(description="Drafts for speculative decoding: 'ngram' or 'off'.")
    speculative_max_draft: int = Field(description="Drafts a stream may send per step at most.")
    speculative: SpeculativeView = Field(description="Every request's drafts since start-up.")


class TokenizerView(BaseModel):
    address: str = Field(description="host:port of the tokenizer.")
    healthy: bool
    vocab_size: int = Field(description="0 when unknown.")
    error: str | None = Field(description="Why it is unhealthy.")


class CapacityView(BaseModel):
    """What a node reported before loading, with `layers: auto` (its part's layers follow from it)."""

    limit_bytes: int = Field(description="The node's memory limit, which its part's range must fit under.")
    layer_bytes: int = Field(description="Weight bytes of the model's largest layer.")
    kv_tokens: int = Field(
        description="KV positions placement counts for it: cache_budget_tokens, or auto's minimum."
    )
    ms_per_layer: float = Field(description="Time of one layer on a batch of 8 tokens, milliseconds.")


class MemoryView(BaseModel):
    """A node's memory limit and what its share takes under it (README: Memory budgets)."""

    limit_bytes: int = Field(
        description="Bytes the node may use (memory_limit); its share was checked against it."
    )
    limit_source: str = Field(description="Where the limit comes from: 'config', 'cgroup' or 'machine'.")
    limit_reason: str = Field(description="How, e.g. 'auto: cgroup v2 memory.max of /: 2.00 GiB'.")
    weights_bytes: int = Field(description="Its share's weights, from the model file's header.")
    kv_bytes: int = Field(description="Its KV pool, whole (pages are touched as requests use them).")
    runtime_bytes: int = Field(description="The runtime allowance: interpreter, threads, one step's scratch.")
    need_bytes: int = Field(description="weights + KV + runtime: what the share takes at most.")
    left_bytes: int = Field(description="limit - need: what is left under the limit.")


class NodeView(BaseModel):
    id: str
    address: str
    part: int = Field(description="Model part it serves.")
    layers: tuple[int, int] = Field(description="Half-open layer range [start, end).")
    healthy: bool
    error: str | None = Field(description="Why it is unhealthy.")
    requests_in_flight: int = Field(description="Requests holding a cache there, or Forward calls in flight.")
    cache_used_tokens: int = Field(description="KV positions of the blocks requests hold now.")
    cache_budget_tokens: int = Field(description="KV positions of the node's preallocated block pool.")
    cache_block_size: int = Field(description="Token positions per KV block.")
    kv_dtype: str = Field(
        description="Element type of the node's KV cache: f32, f16, bf16 or q8_0 (config kv_dtype)."
    )
    kv_window: int = Field(
        0,
        description="The sliding window every layer of the node's share has: a sequence keeps only the KV "
        "blocks of its last kv_window positions (and one step) there, so no request is too long for it; 0: "
        "every position is kept.",
    )
    cache_blocks_total: int = Field(description="Blocks in the pool.")
    cache_blocks_free: int = Field(description="Blocks no request holds (some keep a cached prefix).")
    prefix_cached_blocks: int = Field(
        description="Full blocks known by hash: prefixes new requests can share."
    )
    prefix_hit_tokens: int = Field(description="Prompt positions served from cached blocks since start-up.")
    backoff_s: float = Field(description="Seconds before a node that failed is trusted again (0: trusted).")
    rss_bytes: int = Field(description="Resident memory of the node process.")
    cache_resident_bytes: int = Field(
        description="KV-cache bytes in memory: the pool's blocks written so far (never-written pages cost nothing; blocks unused for cache_ttl_s are handed back)."
    )
    weights_bytes: int = Field(
        description="Weight bytes the node holds: its GGUF tensors in block form (or the checkpoint's dtype); 0 while loading."
    )
    weight_types: dict[str, int] = Field(description="Weight matrices per storage type, e.g. {'Q4_1': 70}.")
    kernel: str = Field(
        description="Native kernel path and threads, e.g. 'avx2 x2', or 'avx512 x2 int8' with the opt-in lossy "
        "int8 mode (lossy_int8) on, '... batch-invariant' with node_defaults.batch_invariant ('' while loading)."
    )
    threads_reason: str = Field(
        description="Why the kernel pool has that many threads: 'set to 2 in the config', or auto's "
        "arithmetic, e.g. 'auto: 16 cores (affinity) / 3 nodes computing at once (...)' ('' while loading)."
    )
    host_id: str = Field(
        description="Hash naming the cores the node draws from: nodes with the same one share them ('' while loading)."
    )
    last_forward_ms: float | None = Field(
        description="Compute time of its last Forward (null before the first)."
    )
    mean_forward_ms: float | None = Field(
        description="Mean compute time per Forward (null before the first)."
    )
    forwards_total: int
    capacity: CapacityView | None = Field(
        None, description="With `layers: auto`: what the node reported before loading (null otherwise)."
    )
    memory: MemoryView | None = Field(
        None, description="Its memory limit, what its share takes and what is left (null while loading)."
    )
    load_s: float | None = Field(
        None, description="Seconds its layers took to load at start-up (null while loading)."
    )


class ClusterView(BaseModel):
    """What GET /api/cluster returns; the frontend's cluster view reads it."""

    ready: bool = Field(description="The cluster can serve requests.")
    problems: list[str] = Field(description="Why it is not ready.")
    model: ModelView
    coordinator: CoordinatorView
    tokenizer: TokenizerView
    nodes: list[NodeView] = Field(
        description="Every node the coordinator knows (empty when it is unreachable)."
    )

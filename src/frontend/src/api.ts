// Typed client for the pipeserve REST API (src/api/api.py). Every function here either resolves
// or rejects with an ApiError, never with a raw TypeError/DOMException, so components can show any
// failure as-is. Streaming endpoints are read with fetch + ReadableStream and parsed as SSE.

// ---- Wire types (mirror the API's JSON schemas) ----

export type Role = "system" | "user" | "assistant";

export interface ChatMessage {
  role: Role;
  content: string;
}

/** Sampling controls shared by /v1/chat/completions and /v1/completions. */
export interface SamplingParams {
  max_tokens: number;
  temperature: number;
  top_p: number;
  /** 0 disables top-k. */
  top_k: number;
  /** null = random; omitted from the request body. */
  seed: number | null;
  stop: string[];
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

/** One pipeline stage of the path a request took. */
export interface RouteHop {
  part: number;
  node_id: string;
  address: string;
}

/** Speculative decoding's counts for a request (or the whole cluster). */
export interface SpeculativeInfo {
  drafted: number;
  accepted: number;
  acceptance_rate: number;
  passes: number;
  tokens_per_pass: number;
}

/** pipeserve's extension on the final chunk of a stream. */
export interface PipeserveInfo {
  route: RouteHop[];
  ttft_ms: number;
  total_ms: number;
  /** Absent from servers older than speculative decoding. */
  speculative?: SpeculativeInfo;
}

export type FinishReason = "stop" | "length" | (string & {});

export interface ChatChunk {
  id: string;
  object: "chat.completion.chunk";
  created: number;
  model: string;
  choices: { index: number; delta: { role?: Role; content?: string }; finish_reason: FinishReason | null }[];
  usage?: Usage | null;
  pipeserve?: PipeserveInfo | null;
}

export interface CompletionChunk {
  id: string;
  object: "text_completion";
  created: number;
  model: string;
  choices: { index: number; text: string; finish_reason: FinishReason | null }[];
  usage?: Usage | null;
  pipeserve?: PipeserveInfo | null;
}

/** The API's one error body (src/api/errors.py); every key is present, null where it does not apply. */
export interface ErrorBody {
  error: {
    message: string;
    type: string;
    /** The machine-readable reason, e.g. "queue_full" (src/common/errors.py: Reason). */
    code: string;
    /** The request field it concerns (OpenAI style), e.g. "messages" or "metadata.type". */
    param: string | null;
    /** The HTTP status, also inside SSE error events. */
    status: number;
    /** The model part (pipeline stage) and node that failed. */
    part: number | null;
    node: string | null;
    /** Seconds to wait before a retry helps (the Retry-After header's value). */
    retry_after_s: number | null;
  };
}

export interface ModelList {
  object: "list";
  data: { id: string; object: "model"; owned_by: string }[];
}

export interface NodeStatus {
  id: string;
  address: string;
  part: number;
  /** Half-open layer range [start, end). */
  layers: [number, number];
  healthy: boolean;
  error: string | null;
  requests_in_flight: number;
  /** KV positions of the blocks requests hold now. */
  cache_used_tokens: number;
  /** KV positions of the node's preallocated block pool. */
  cache_budget_tokens: number;
  cache_block_size: number;
  /** Element type of the node's KV cache: f32, f16, bf16 or q8_0 (config kv_dtype). */
  kv_dtype: string;
  /** Sliding window of every layer of its share: a sequence keeps only its last kv_window positions there; 0: all. */
  kv_window: number;
  cache_blocks_total: number;
  cache_blocks_free: number;
  /** Full blocks known by hash (prefixes new requests can share). */
  prefix_cached_blocks: number;
  /** Prompt positions served from cached blocks since start-up. */
  prefix_hit_tokens: number;
  /** Seconds before a node that failed is trusted again (0: trusted). */
  backoff_s: number;
  rss_bytes: number;
  /** KV-cache bytes in memory (the pool's blocks written so far). */
  cache_resident_bytes: number;
  /** Weight bytes held (GGUF blocks as stored). */
  weights_bytes: number;
  /** Weight matrices per storage type, e.g. {"Q4_1": 70}. */
  weight_types: Record<string, number>;
  /** Native kernel path and threads, e.g. "avx2 x2". */
  kernel: string;
  /** Why the kernel pool has that many threads, e.g. "auto: 16 cores (affinity) / 3 nodes computing at once (...)". */
  threads_reason?: string;
  last_forward_ms: number | null;
  mean_forward_ms: number | null;
  forwards_total: number;
  /** With `layers: auto`: what the node reported before loading (null otherwise). */
  capacity?: { limit_bytes: number; layer_bytes: number; kv_tokens: number; ms_per_layer: number } | null;
  /** Its memory limit, what its share takes under it and what is left (null while loading). */
  memory?: NodeMemory | null;
  /** Seconds its layers took to load at start-up (null while loading). */
  load_s?: number | null;
}

/** A node's memory budget: its share (weights + KV pool + runtime) was checked against the limit. */
export interface NodeMemory {
  limit_bytes: number;
  /** Where the limit comes from. */
  limit_source: "config" | "cgroup" | "machine";
  /** How, e.g. "auto: cgroup v2 memory.max of /: 2.00 GiB". */
  limit_reason: string;
  weights_bytes: number;
  kv_bytes: number;
  runtime_bytes: number;
  need_bytes: number;
  left_bytes: number;
}

export interface ClusterStatus {
  ready: boolean;
  problems: string[];
  model: { name: string; checksum: string; arch: string; n_layers: number };
  coordinator: {
    address: string;
    healthy: boolean;
    running: number;
    waiting: number;
    max_running: number;
    max_waiting: number;
    micro_batches: number;
    /** Why that many groups, e.g. "all 3 nodes on one host (...): one stage computes at a time, on all its cores". */
    micro_batches_reason?: string;
  };
  tokenizer: { address: string; healthy: boolean; vocab_size: number; error: string | null };
  nodes: NodeStatus[];
}

// ---- Errors ----

/**
 * http: the server answered with an error status; stream: an error event inside an SSE stream;
 * network: the API could not be reached; protocol: the server answered something unparseable.
 */
export type ApiErrorKind = "http" | "stream" | "network" | "protocol";

export interface ApiErrorFields {
  status?: number | null;
  type?: string | null;
  /** The body's `code`: the reason, e.g. "stage_unavailable". */
  reason?: string | null;
  param?: string | null;
  part?: number | null;
  node?: string | null;
  retryAfterS?: number | null;
}

export class ApiError extends Error {
  readonly kind: ApiErrorKind;
  /** HTTP status (the body's `status` for a stream error), null when there is none. */
  readonly status: number | null;
  readonly type: string | null;
  /** The machine-readable reason (the body's `code`), null when the server gave none. */
  readonly reason: string | null;
  readonly param: string | null;
  readonly part: number | null;
  readonly node: string | null;
  /** Seconds from the Retry-After header (or the body's retry_after_s), null when absent. */
  readonly retryAfterS: number | null;

  constructor(kind: ApiErrorKind, message: string, opts: ApiErrorFields = {}) {
    super(message);
    this.name = "ApiError";
    this.kind = kind;
    this.status = opts.status ?? null;
    this.type = opts.type ?? null;
    this.reason = opts.reason ?? null;
    this.param = opts.param ?? null;
    this.part = opts.part ?? null;
    this.node = opts.node ?? null;
    this.retryAfterS = opts.retryAfterS ?? null;
  }
}

export function isAbortError(e: unknown): boolean {
  return (
    (typeof DOMException !== "undefined" && e instanceof DOMException && e.name === "AbortError") ||
    (e instanceof Error && e.name === "AbortError")
  );
}

/** Retry-After is either delay-seconds or an HTTP date (RFC 9110 §10.2.3). */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | null {
  if (value === null || value.trim() === "") return null;
  const secs = Number(value.trim());
  if (Number.isFinite(secs)) return Math.max(0, Math.ceil(secs));
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - now) / 1000));
}

const str = (v: unknown): string | null => (typeof v === "string" ? v : null);
const num = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);

/** The fields of the API's error body (read as data, never parsed out of the message). A body
 * of another shape (a proxy's, FastAPI's default `{detail}`) gives its text and no fields. */
function errorFromBody(body: unknown): (ApiErrorFields & { message: string }) | null {
  if (typeof body !== "object" || body === null) return null;
  const err = (body as { error?: unknown }).error;
  if (typeof err === "object" && err !== null && typeof (err as { message?: unknown }).message === "string") {
    const e = err as Record<string, unknown>;
    return {
      message: e.message as string,
      type: str(e.type),
      reason: str(e.code),
      param: str(e.param),
      status: num(e.status),
      part: num(e.part),
      node: str(e.node),
      retryAfterS: num(e.retry_after_s),
    };
  }
  const detail = (body as { detail?: unknown }).detail;
  if (typeof detail === "string") return { message: detail };
  if (Array.isArray(detail)) {
    const parts = detail.map((d: { loc?: unknown[]; msg?: string }) =>
      Array.isArray(d.loc) ? `${d.loc.filter((l) => l !== "body").join(".")}: ${d.msg ?? ""}` : String(d.msg ?? d),
    );
    return { message: parts.join("; "), type: "invalid_request_error" };
  }
  return null;
}

async function errorFromResponse(res: Response): Promise<ApiError> {
  let text = "";
  try {
    text = await res.text();
  } catch {
    // The body is unreadable; the status alone still says what happened.
  }
  let parsed: ReturnType<typeof errorFromBody> = null;
  try {
    parsed = errorFromBody(JSON.parse(text));
  } catch {
    parsed = null;
  }
  const fallback = text.trim().slice(0, 300) || res.statusText || `HTTP ${res.status}`;
  return new ApiError("http", parsed?.message || fallback, {
    ...parsed,
    status: res.status,
    retryAfterS: parseRetryAfter(res.headers.get("Retry-After")) ?? parsed?.retryAfterS ?? null,
  });
}

/** fetch that turns a network failure into ApiError("network") and lets aborts through. */
async function send(url: string, init: RequestInit): Promise<Response> {
  try {
    return await fetch(url, init);
  } catch (e) {
    if (isAbortError(e)) throw e;
    const why = e instanceof Error ? e.message : String(e);
    throw new ApiError("network", `Cannot reach the API (${url}): ${why}`);
  }
}

async function getJson<T>(url: string, signal?: AbortSignal): Promise<T> {
  const res = await send(url, { headers: { Accept: "application/json" }, signal });
  if (!res.ok) throw await errorFromResponse(res);
  try {
    return (await res.json()) as T;
  } catch {
    throw new ApiError("protocol", `${url} did not return JSON`, { status: res.status });
  }
}

// ---- Plain endpoints ----

export async function fetchModels(signal?: AbortSignal): Promise<string[]> {
  const list = await getJson<ModelList>("/v1/models", signal);
  return Array.isArray(list.data) ? list.data.map((m) => m.id) : [];
}

export function fetchCluster(signal?: AbortSignal): Promise<ClusterStatus> {
  return getJson<ClusterStatus>("/api/cluster", signal);
}

// ---- SSE ----

/**
 * Incremental Server-Sent Events parser (WHATWG HTML §9.2.6, data fields only). Feed it decoded
 * text in arbitrary pieces; it returns the data payload of each event completed so far. A lone
 * "\r" at the end of a piece is held back in case the next piece starts with "\n".
 */
export class SseParser {
  private buf = "";
  private data: string[] = [];

  feed(text: string): string[] {
    this.buf += text;
    const events: string[] = [];
    const eol = /\r\n|\r(?!$)|\n/g;
    let start = 0;
    let m: RegExpExecArray | null;
    while ((m = eol.exec(this.buf)) !== null) {
      this.line(this.buf.slice(start, m.index), events);
      start = m.index + m[0].length;
    }
    this.buf = this.buf.slice(start);
    return events;
  }

  /** End of stream: a last line or event without its terminator still counts. */
  flush(): string[] {
    const events: string[] = [];
    if (this.buf !== "") this.line(this.buf.replace(/\r$/, ""), events);
    this.buf = "";
    this.line("", events);
    return events;
  }

  private line(line: string, events: string[]): void {
    if (line === "") {
      if (this.data.length > 0) events.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // comment / keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
  }
}

/** Yields each SSE data payload from a byte stream; UTF-8 sequences may be split across reads. */
export async function* sseData(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      yield* parser.feed(decoder.decode(value, { stream: true }));
    }
    yield* parser.feed(decoder.decode());
    yield* parser.flush();
  } finally {
    // Cancelling tells fetch to drop the connection (the server then cancels the request).
    reader.cancel().catch(() => undefined);
  }
}

// ---- Streaming generation ----

export interface StreamResult {
  text: string;
  finishReason: FinishReason | null;
  usage: Usage | null;
  pipeserve: PipeserveInfo | null;
  /** Chunks that carried text: the token count when the server sends no usage. */
  textChunks: number;
  /** Measured here, from sending the request to the first text. */
  clientTtftMs: number | null;
  clientTotalMs: number;
  /** The caller aborted (Stop); text holds what arrived before. */
  aborted: boolean;
}

export interface StreamOptions {
  signal?: AbortSignal;
  /** Called with each piece of text as it arrives. */
  onText?: (delta: string) => void;
  /** Injectable clock for tests. */
  now?: () => number;
}

export type ChatRequest = SamplingParams & { model: string; messages: ChatMessage[] };
export type CompletionRequest = SamplingParams & { model: string; prompt: string };

function samplingBody(p: SamplingParams): Record<string, unknown> {
  const body: Record<string, unknown> = {
    max_tokens: p.max_tokens,
    temperature: p.temperature,
    top_p: p.top_p,
    top_k: p.top_k,
    stop: p.stop,
  };
  if (p.seed !== null) body.seed = p.seed;
  return body;
}

export function streamChat(req: ChatRequest, opts: StreamOptions = {}): Promise<StreamResult> {
  const body = {
    model: req.model,
    messages: req.messages,
    ...samplingBody(req),
    stream: true,
    stream_options: { include_usage: true },
  };
  return streamGeneration("/v1/chat/completions", body, (c) => {
    const choice = (c as ChatChunk).choices?.[0];
    return { text: choice?.delta?.content ?? "", finish: choice?.finish_reason ?? null };
  }, opts);
}

export function streamCompletion(req: CompletionRequest, opts: StreamOptions = {}): Promise<StreamResult> {
  const body = { model: req.model, prompt: req.prompt, ...samplingBody(req), stream: true };
  return streamGeneration("/v1/completions", body, (c) => {
    const choice = (c as CompletionChunk).choices?.[0];
    return { text: choice?.text ?? "", finish: choice?.finish_reason ?? null };
  }, opts);
}

async function streamGeneration(
  url: string,
  body: Record<string, unknown>,
  pick: (chunk: unknown) => { text: string; finish: FinishReason | null },
  opts: StreamOptions,
): Promise<StreamResult> {
  const now = opts.now ?? (() => performance.now());
  const t0 = now();
  const result: StreamResult = {
    text: "",
    finishReason: null,
    usage: null,
    pipeserve: null,
    textChunks: 0,
    clientTtftMs: null,
    clientTotalMs: 0,
    aborted: false,
  };
  let sawDone = false;
  try {
    const res = await send(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: opts.signal,
    });
    if (!res.ok) throw await errorFromResponse(res);
    if (res.body === null) throw new ApiError("protocol", `${url} returned an empty body`, { status: res.status });

    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") {
        sawDone = true;
        break;
      }
      let chunk: unknown;
      try {
        chunk = JSON.parse(data);
      } catch {
        throw new ApiError("protocol", `Malformed stream chunk: ${data.slice(0, 120)}`);
      }
      const err = errorFromBody(chunk);
      if (err !== null) throw new ApiError("stream", err.message, err);
      const { text, finish } = pick(chunk);
      if (text !== "") {
        if (result.clientTtftMs === null) result.clientTtftMs = now() - t0;
        result.text += text;
        result.textChunks += 1;
        opts.onText?.(text);
      }
      if (finish !== null) result.finishReason = finish;
      const extra = chunk as { usage?: Usage | null; pipeserve?: PipeserveInfo | null };
      if (extra.usage) result.usage = extra.usage;
      if (extra.pipeserve) result.pipeserve = extra.pipeserve;
    }
    if (!sawDone && result.finishReason === null && !opts.signal?.aborted) {
      throw new ApiError("protocol", "The connection closed before the reply finished");
    }
  } catch (e) {
    if (!(isAbortError(e) || opts.signal?.aborted)) {
      throw e instanceof ApiError ? e : new ApiError("network", `Stream interrupted: ${e instanceof Error ? e.message : String(e)}`);
    }
    result.aborted = true;
  }
  result.clientTotalMs = now() - t0;
  return result;
}

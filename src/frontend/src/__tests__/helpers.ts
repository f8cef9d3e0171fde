// Test doubles for the API: SSE bodies fed in arbitrary pieces, JSON responses, the API's real
// error answers (src/__fixtures__/api_errors.json), and a fetch mock that routes by URL and
// records every request.
import { vi } from "vitest";
import type { ClusterStatus, NodeStatus } from "../api";
import fixture from "../__fixtures__/api_errors.json";

const enc = new TextEncoder();

/** `data: {json}\n\n` for each payload, then `data: [DONE]`. */
export function sse(payloads: unknown[], done = true): string {
  return payloads.map((p) => `data: ${typeof p === "string" ? p : JSON.stringify(p)}\n\n`).join("") + (done ? "data: [DONE]\n\n" : "");
}

/** Cuts text into pieces of `size` bytes (so lines, and even UTF-8 characters, are split). */
export function splitBytes(text: string, size: number): Uint8Array[] {
  const bytes = enc.encode(text);
  const out: Uint8Array[] = [];
  for (let i = 0; i < bytes.length; i += size) out.push(bytes.slice(i, i + size));
  return out;
}

/** A stream the test feeds by hand; it errors with AbortError when `signal` aborts, like fetch. */
export class ManualStream {
  private ctrl!: ReadableStreamDefaultController<Uint8Array>;
  readonly stream: ReadableStream<Uint8Array>;
  cancelled = false;

  constructor() {
    this.stream = new ReadableStream<Uint8Array>({
      start: (c) => {
        this.ctrl = c;
      },
      cancel: () => {
        this.cancelled = true;
      },
    });
  }
  push(text: string | Uint8Array): void {
    this.ctrl.enqueue(typeof text === "string" ? enc.encode(text) : text);
  }
  close(): void {
    this.ctrl.close();
  }
  bindAbort(signal: AbortSignal | null | undefined): void {
    signal?.addEventListener("abort", () => {
      try {
        this.ctrl.error(new DOMException("The operation was aborted.", "AbortError"));
      } catch {
        // already closed
      }
    });
  }
}

export function sseResponse(body: string | Uint8Array[] | ReadableStream<Uint8Array>, status = 200): Response {
  let stream: ReadableStream<Uint8Array>;
  if (body instanceof ReadableStream) stream = body;
  else {
    const pieces = typeof body === "string" ? [enc.encode(body)] : body;
    stream = new ReadableStream({
      start(c) {
        for (const p of pieces) c.enqueue(p);
        c.close();
      },
    });
  }
  return new Response(stream, { status, headers: { "Content-Type": "text/event-stream" } });
}

export function jsonResponse(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });
}

/** The API's real error answers, one per reason a client can provoke: written by tests/test_errors.py
 * against a running cluster, which fails when they no longer match what the API sends. */
export const API_ERRORS = fixture.cases;
export const NOT_PROVOKED: readonly string[] = fixture.not_provoked;
export type ApiErrorCase = keyof typeof fixture.cases;

/** The API's captured HTTP answer for `name`: its status, Retry-After and body. */
export function apiError(name: ApiErrorCase): Response {
  const c = API_ERRORS[name];
  return jsonResponse(c.body, c.status, c.retry_after === null ? {} : { "Retry-After": c.retry_after });
}

/** The error event of a captured stream (the same body, sent after the status line). */
export function apiErrorEvent(name: ApiErrorCase): unknown {
  return API_ERRORS[name].body;
}

export interface Call {
  url: string;
  init: RequestInit | undefined;
  body: Record<string, unknown> | null;
}

type Handler = (call: Call) => Response | Promise<Response>;

/** Installs a fetch mock. `routes` maps a URL prefix to a handler; /v1/models answers by default. */
export function mockFetch(routes: Record<string, Handler>) {
  const calls: Call[] = [];
  const all: Record<string, Handler> = {
    "/v1/models": () => jsonResponse({ object: "list", data: [{ id: "smollm2-135m", object: "model", owned_by: "pipeserve" }] }),
    ...routes,
  };
  const fn = vi.fn(async (input: RequestInfo | URL, init?: RequestInit) => {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    const body = typeof init?.body === "string" ? (JSON.parse(init.body) as Record<string, unknown>) : null;
    const call = { url, init, body };
    calls.push(call);
    const key = Object.keys(all).find((k) => url.startsWith(k));
    if (key === undefined) throw new TypeError(`unmocked ${url}`);
    const handler = all[key];
    if (handler === undefined) throw new TypeError(`unmocked ${url}`);
    return handler(call);
  });
  vi.stubGlobal("fetch", fn);
  return { fn, calls, posts: () => calls.filter((c) => c.init?.method === "POST") };
}

export function chatChunk(content: string | null, finish: string | null = null, extra: Record<string, unknown> = {}) {
  return {
    id: "chatcmpl-1",
    object: "chat.completion.chunk",
    created: 1,
    model: "smollm2-135m",
    choices: [{ index: 0, delta: content === null ? {} : { content }, finish_reason: finish }],
    ...extra,
  };
}

export function completionChunk(text: string, finish: string | null = null, extra: Record<string, unknown> = {}) {
  return { id: "cmpl-1", object: "text_completion", created: 1, model: "smollm2-135m", choices: [{ index: 0, text, finish_reason: finish }], ...extra };
}

export const FINAL_EXTRA = {
  usage: { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 },
  pipeserve: {
    route: [
      { part: 0, node_id: "node1", address: "127.0.0.1:50051" },
      { part: 1, node_id: "node2", address: "127.0.0.1:50052" },
      { part: 2, node_id: "node3", address: "127.0.0.1:50053" },
    ],
    ttft_ms: 40,
    total_ms: 240,
    speculative: { drafted: 4, accepted: 1, acceptance_rate: 0.25, passes: 2, tokens_per_pass: 1.5 },
  },
};

export function node(id: string, part: number, layers: [number, number], over: Partial<NodeStatus> = {}): NodeStatus {
  return {
    id,
    address: `127.0.0.1:5005${part + 1}`,
    part,
    layers,
    healthy: true,
    error: null,
    requests_in_flight: 0,
    cache_used_tokens: 96,
    cache_budget_tokens: 4096,
    cache_block_size: 16,
    kv_dtype: "f32",
    kv_window: 0,
    cache_blocks_total: 256,
    cache_blocks_free: 250,
    prefix_cached_blocks: 12,
    prefix_hit_tokens: 320,
    backoff_s: 0,
    rss_bytes: 512 * 1024 * 1024,
    cache_resident_bytes: 24 * 1024 * 1024,
    weights_bytes: 22 * 1024 * 1024,
    weight_types: { Q4_1: 70 },
    kernel: "avx2 x1",
    threads_reason: "auto: 2 cores (affinity) / 1 node computing at once",
    last_forward_ms: 12.5,
    mean_forward_ms: 10.25,
    forwards_total: 10,
    ...over,
  };
}

export function cluster(nodes: NodeStatus[], over: Partial<ClusterStatus> = {}): ClusterStatus {
  return {
    ready: nodes.every((n) => n.healthy),
    problems: [],
    model: { name: "smollm2-135m", checksum: "sha256:abcdef0123456789", arch: "llama", n_layers: 30 },
    coordinator: { address: "127.0.0.1:50050", healthy: true, running: 1, waiting: 0, max_running: 8, max_waiting: 32, micro_batches: 2, micro_batches_reason: "all 3 nodes on one host" },
    tokenizer: { address: "127.0.0.1:50054", healthy: true, vocab_size: 49152, error: null },
    nodes,
    ...over,
  };
}

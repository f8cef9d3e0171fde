import { afterEach, describe, expect, it, vi } from "vitest";
import { ApiError, parseRetryAfter, SseParser, sseData, streamChat, streamCompletion } from "../api";
import { describeError } from "../errors";
import { parseControls, parseStopSequences, DEFAULT_CONTROLS } from "../params";
import {
  chatChunk,
  completionChunk,
  API_ERRORS,
  apiError,
  apiErrorEvent,
  FINAL_EXTRA,
  jsonResponse,
  mockFetch,
  splitBytes,
  sse,
  sseResponse,
} from "./helpers";

afterEach(() => {
  vi.unstubAllGlobals();
});

const PARAMS = { max_tokens: 16, temperature: 0, top_p: 1, top_k: 0, seed: null, stop: [] };

describe("SseParser", () => {
  it("joins events split anywhere, including between \\r and \\n", () => {
    const text = 'data: {"a":1}\r\n\r\n: keep-alive\n\ndata: x\ndata: y\n\ndata:[DONE]\r\r';
    for (let size = 1; size <= text.length; size++) {
      const p = new SseParser();
      const out: string[] = [];
      for (let i = 0; i < text.length; i += size) out.push(...p.feed(text.slice(i, i + size)));
      out.push(...p.flush());
      expect(out, `piece size ${size}`).toEqual(['{"a":1}', "x\ny", "[DONE]"]);
    }
  });

  it("delivers a final event that lacks its blank line", () => {
    const p = new SseParser();
    expect(p.feed("data: last")).toEqual([]);
    expect(p.flush()).toEqual(["last"]);
  });
});

describe("sseData", () => {
  it("decodes multi-byte UTF-8 split across reads", async () => {
    const text = sse([chatChunk("héllo 世界 🚀")]);
    const out: string[] = [];
    for await (const d of sseData(sseResponse(splitBytes(text, 1)).body!)) out.push(d);
    expect(JSON.parse(out[0]!).choices[0].delta.content).toBe("héllo 世界 🚀");
    expect(out[1]).toBe("[DONE]");
  });
});

describe("streamChat", () => {
  it("streams text, then reads finish reason, usage and route from the final chunk", async () => {
    const body = sse([chatChunk(null, null, {}), chatChunk("Hel"), chatChunk("lo"), chatChunk("!", "length", FINAL_EXTRA)]);
    const { calls } = mockFetch({ "/v1/chat/completions": () => sseResponse(splitBytes(body, 7)) });
    const deltas: string[] = [];
    const r = await streamChat({ model: "m", messages: [{ role: "user", content: "hi" }], ...PARAMS }, { onText: (d) => deltas.push(d) });
    expect(deltas).toEqual(["Hel", "lo", "!"]);
    expect(r.text).toBe("Hello!");
    expect(r.finishReason).toBe("length");
    expect(r.usage?.completion_tokens).toBe(3);
    expect(r.pipeserve?.route.map((h) => h.node_id)).toEqual(["node1", "node2", "node3"]);
    expect(r.aborted).toBe(false);
    expect(calls[0]!.body).toMatchObject({ stream: true, stream_options: { include_usage: true } });
    expect(calls[0]!.body).not.toHaveProperty("seed");
  });

  it("raises an error event inside the stream as ApiError, with the body's fields", async () => {
    mockFetch({ "/v1/chat/completions": () => sseResponse(sse([chatChunk("a"), apiErrorEvent("timeout_mid_stream")], false)) });
    const err = await streamChat({ model: "m", messages: [], ...PARAMS }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApiError);
    expect(err).toMatchObject({ kind: "stream", status: 504, reason: "timeout", message: API_ERRORS.timeout_mid_stream.body.error.message });
  });

  it("flags a stream that closes before finishing", async () => {
    mockFetch({ "/v1/chat/completions": () => sseResponse(sse([chatChunk("a")], false)) });
    await expect(streamChat({ model: "m", messages: [], ...PARAMS })).rejects.toMatchObject({ kind: "protocol" });
  });

  it("maps HTTP errors, Retry-After and FastAPI's default 422 body", async () => {
    const busy = API_ERRORS.queue_full;
    mockFetch({ "/v1/chat/completions": () => apiError("queue_full") });
    await expect(streamChat({ model: "m", messages: [], ...PARAMS })).rejects.toMatchObject({
      status: 429,
      reason: "queue_full",
      retryAfterS: Number(busy.retry_after),
      message: busy.body.error.message,
    });
    mockFetch({
      "/v1/chat/completions": () => jsonResponse({ detail: [{ loc: ["body", "temperature"], msg: "must be >= 0" }] }, 422),
    });
    await expect(streamChat({ model: "m", messages: [], ...PARAMS })).rejects.toMatchObject({ status: 422, message: "temperature: must be >= 0" });
  });

  it("turns a failed fetch into a network ApiError", async () => {
    vi.stubGlobal("fetch", vi.fn(() => Promise.reject(new TypeError("Failed to fetch"))));
    await expect(streamChat({ model: "m", messages: [], ...PARAMS })).rejects.toMatchObject({ kind: "network" });
  });

  it("returns the partial text, marked aborted, when the caller aborts", async () => {
    const ctrl = new AbortController();
    mockFetch({
      "/v1/chat/completions": ({ init }) => {
        const stream = new ReadableStream<Uint8Array>({
          start(c) {
            c.enqueue(new TextEncoder().encode(sse([chatChunk("par")], false)));
            init?.signal?.addEventListener("abort", () => c.error(new DOMException("aborted", "AbortError")));
          },
        });
        return sseResponse(stream);
      },
    });
    const r = await streamChat({ model: "m", messages: [], ...PARAMS }, { signal: ctrl.signal, onText: () => ctrl.abort() });
    expect(r).toMatchObject({ text: "par", aborted: true, finishReason: null });
  });
});

describe("streamCompletion", () => {
  it("posts the prompt and reads choices[0].text", async () => {
    const { calls } = mockFetch({ "/v1/completions": () => sseResponse(sse([completionChunk("foo"), completionChunk(" bar", "stop")])) });
    const r = await streamCompletion({ model: "m", prompt: "p", ...PARAMS, seed: 7 });
    expect(r.text).toBe("foo bar");
    expect(r.finishReason).toBe("stop");
    expect(calls[0]!.body).toMatchObject({ model: "m", prompt: "p", seed: 7, stream: true });
  });
});

describe("helpers", () => {
  it("parses Retry-After as seconds or a date", () => {
    expect(parseRetryAfter("3")).toBe(3);
    expect(parseRetryAfter("1.2")).toBe(2);
    expect(parseRetryAfter(null)).toBeNull();
    expect(parseRetryAfter(new Date(10_000).toUTCString(), 0)).toBe(10);
  });

  it("splits stop sequences on commas and newlines, with escapes", () => {
    expect(parseStopSequences("")).toEqual([]);
    expect(parseStopSequences("User:, ###\nEND")).toEqual(["User:", "###", "END"]);
    expect(parseStopSequences("\\n\\n, a\\,b")).toEqual(["\n\n", "a,b"]);
  });

  it("converts the default controls to the documented defaults", () => {
    expect(parseControls(DEFAULT_CONTROLS)).toEqual({
      ok: true,
      params: { max_tokens: 128, temperature: 0.7, top_p: 1, top_k: 0, seed: null, stop: [] },
    });
    expect(parseControls({ ...DEFAULT_CONTROLS, maxTokens: "1.5", seed: "x" })).toMatchObject({ ok: false });
  });

  it("reads part, node, param and retry-after from the body, not from the message", async () => {
    mockFetch({ "/v1/chat/completions": () => apiError("cache_exhausted") });
    const full = await streamChat({ model: "m", messages: [], ...PARAMS }).catch((e: unknown) => e);
    expect(full).toMatchObject({ reason: "cache_exhausted", part: 0, node: "node1", retryAfterS: API_ERRORS.cache_exhausted.body.error.retry_after_s });
    mockFetch({ "/v1/chat/completions": () => apiError("context_length_exceeded") });
    const long = await streamChat({ model: "m", messages: [], ...PARAMS }).catch((e: unknown) => e);
    expect(describeError(long)).toMatchObject({ reason: "context_length_exceeded", param: "messages", part: null, node: null });
  });
});

import { act, fireEvent, render, screen, waitFor, within } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Playground } from "../components/Playground";
import {
  chatChunk,
  completionChunk,
  API_ERRORS,
  apiError,
  apiErrorEvent,
  FINAL_EXTRA,
  ManualStream,
  mockFetch,
  splitBytes,
  sse,
  sseResponse,
} from "./helpers";

afterEach(() => {
  vi.unstubAllGlobals();
  vi.useRealTimers();
});

function type(text: string): void {
  fireEvent.change(screen.getByTestId("prompt-input"), { target: { value: text } });
}

function setParam(name: string, value: string): void {
  fireEvent.change(screen.getByTestId(`param-${name}`), { target: { value } });
}

async function sendAndFinish(): Promise<void> {
  fireEvent.click(screen.getByTestId("send-button"));
  await screen.findByTestId("finish-reason");
}

describe("Playground streaming", () => {
  it("renders the reply token by token from SSE chunks split mid-line", async () => {
    const stream = new ManualStream();
    mockFetch({ "/v1/chat/completions": () => sseResponse(stream.stream) });
    render(<Playground />);
    type("Say hello");
    fireEvent.click(screen.getByTestId("send-button"));

    expect(await screen.findByTestId("message-user")).toHaveTextContent("Say hello");
    expect(screen.getByTestId("send-button")).toBeDisabled();
    expect(screen.getByTestId("stop-button")).toBeEnabled();

    const wire = sse([chatChunk("", null, { choices: [{ index: 0, delta: { role: "assistant" }, finish_reason: null }] }), chatChunk("Hel")], false);
    // First event plus half of the second: only complete events count.
    const cut = wire.length - 8;
    act(() => stream.push(wire.slice(0, cut)));
    await waitFor(() => expect(screen.getByTestId("reply")).toHaveTextContent(/^$/));
    act(() => stream.push(wire.slice(cut)));
    await waitFor(() => expect(screen.getByTestId("reply")).toHaveTextContent("Hel"));
    expect(screen.queryByTestId("finish-reason")).toBeNull();

    const rest = sse([chatChunk("lo wor"), chatChunk("ld", "stop", FINAL_EXTRA)]);
    expect(screen.getByTestId("reply-stats")).toHaveTextContent("1 token");
    for (const piece of splitBytes(rest, 5)) act(() => stream.push(piece));
    act(() => stream.close());

    expect(await screen.findByTestId("finish-reason")).toHaveTextContent("stop");
    expect(screen.getByTestId("reply")).toHaveTextContent("Hello world");
    const stats = screen.getByTestId("reply-stats");
    expect(within(stats).getByTestId("stat-ttft")).toHaveTextContent("40.0 ms");
    expect(within(stats).getByTestId("stat-tokens")).toHaveTextContent("3");
    // (3 - 1) tokens over (240 - 40) ms after the first.
    expect(within(stats).getByTestId("stat-tps")).toHaveTextContent("10.0");
    // speculative decoding: 3 tokens in 2 passes through the pipeline
    expect(within(stats).getByTestId("stat-tokens-per-pass")).toHaveTextContent("1.50");
    expect(screen.getByTestId("reply-route")).toHaveTextContent("0:node1");
    expect(screen.getByTestId("reply-route")).toHaveTextContent("2:node3");
    expect(screen.getByTestId("send-button")).toBeDisabled(); // input is empty again
    expect(screen.getByTestId("stop-button")).toBeDisabled();
  });

  it("Stop aborts the request and keeps the partial reply", async () => {
    const stream = new ManualStream();
    const { posts } = mockFetch({
      "/v1/chat/completions": ({ init }) => {
        stream.bindAbort(init?.signal);
        return sseResponse(stream.stream);
      },
    });
    render(<Playground />);
    type("Count");
    fireEvent.click(screen.getByTestId("send-button"));
    act(() => stream.push(sse([chatChunk("1, 2,")], false)));
    await waitFor(() => expect(screen.getByTestId("reply")).toHaveTextContent("1, 2,"));

    fireEvent.click(screen.getByTestId("stop-button"));
    expect(await screen.findByTestId("finish-reason")).toHaveTextContent("cancelled");
    expect(posts()[0]!.init?.signal?.aborted).toBe(true);
    expect(screen.getByTestId("reply")).toHaveTextContent("1, 2,");
    expect(screen.queryByTestId("error-banner")).toBeNull();
  });

  it("sends the whole conversation on the next chat turn", async () => {
    let n = 0;
    const { posts } = mockFetch({
      "/v1/chat/completions": () => sseResponse(sse([chatChunk(n++ === 0 ? "Paris." : "About 2M."), chatChunk(null, "stop")])),
    });
    render(<Playground />);
    type("Capital of France?");
    await sendAndFinish();
    type("Population?");
    fireEvent.keyDown(screen.getByTestId("prompt-input"), { key: "Enter" });
    await waitFor(() => expect(screen.getByTestId("reply")).toHaveTextContent("About 2M."));

    expect(posts()[1]!.body!.messages).toEqual([
      { role: "user", content: "Capital of France?" },
      { role: "assistant", content: "Paris." },
      { role: "user", content: "Population?" },
    ]);
    expect(screen.getAllByTestId("message-assistant")).toHaveLength(1);
    expect(screen.getAllByTestId("reply")).toHaveLength(1);
  });

  it("completion mode posts the raw prompt to /v1/completions", async () => {
    const { posts } = mockFetch({
      "/v1/completions": () => sseResponse(sse([completionChunk(" upon"), completionChunk(" a time", "length")])),
    });
    render(<Playground />);
    fireEvent.click(screen.getByTestId("mode-completion"));
    type("Once");
    await sendAndFinish();
    expect(screen.getByTestId("reply")).toHaveTextContent("upon a time");
    expect(screen.getByTestId("finish-reason")).toHaveTextContent("length");
    expect(posts()[0]!.url).toBe("/v1/completions");
    expect(posts()[0]!.body).toMatchObject({ model: "smollm2-135m", prompt: "Once", stream: true });
  });
});

describe("Playground controls", () => {
  it("sends the defaults: 128 tokens, T 0.7, top-p 1, top-k 0, random seed, no stop", async () => {
    const { posts } = mockFetch({ "/v1/chat/completions": () => sseResponse(sse([chatChunk("ok", "stop")])) });
    render(<Playground />);
    type("hi");
    await sendAndFinish();
    const body = posts()[0]!.body!;
    expect(body).toMatchObject({
      model: "smollm2-135m",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 128,
      temperature: 0.7,
      top_p: 1,
      top_k: 0,
      stop: [],
      stream: true,
      stream_options: { include_usage: true },
    });
    expect(body).not.toHaveProperty("seed");
  });

  it("sends what the controls say", async () => {
    const { posts } = mockFetch({ "/v1/chat/completions": () => sseResponse(sse([chatChunk("ok", "stop")])) });
    render(<Playground />);
    setParam("maxTokens", "32");
    setParam("temperature", "0");
    setParam("topP", "0.9");
    setParam("topK", "40");
    setParam("seed", "1234");
    setParam("stop", "User:, ###\n\\n\\n");
    type("hi");
    await sendAndFinish();
    expect(posts()[0]!.body).toMatchObject({
      max_tokens: 32,
      temperature: 0,
      top_p: 0.9,
      top_k: 40,
      seed: 1234,
      stop: ["User:", "###", "\n\n"],
    });
  });

  it("refuses to send a control that is not a number", async () => {
    const { posts } = mockFetch({});
    render(<Playground />);
    setParam("maxTokens", "");
    type("hi");
    fireEvent.click(screen.getByTestId("send-button"));
    expect(await screen.findByText("must be a number")).toBeInTheDocument();
    expect(posts()).toHaveLength(0);
  });
});

describe("Playground errors", () => {
  it("429 says busy and when to retry, from Retry-After", async () => {
    mockFetch({ "/v1/chat/completions": () => apiError("queue_full") });
    render(<Playground />);
    type("hi");
    fireEvent.click(screen.getByTestId("send-button"));
    const banner = await screen.findByTestId("error-banner");
    expect(banner).toHaveTextContent(`busy, retry in ${API_ERRORS.queue_full.retry_after} s`);
    // Nothing was generated: the message goes back to the input for a retry.
    expect(screen.getByTestId("prompt-input")).toHaveValue("hi");
    expect(screen.queryByTestId("reply")).toBeNull();
  });

  it("503 names the model part and node that are down", async () => {
    mockFetch({ "/v1/chat/completions": () => apiError("stage_unavailable") });
    render(<Playground />);
    type("hi");
    fireEvent.click(screen.getByTestId("send-button"));
    const banner = await screen.findByTestId("error-banner");
    expect(banner).toHaveTextContent("Model part 0 is down (node node1)");
    expect(banner).toHaveTextContent("part 0 has no healthy node: node1");
  });

  it("422 names the field and shows what was wrong", async () => {
    mockFetch({ "/v1/chat/completions": () => apiError("schema_violation") });
    render(<Playground />);
    type("hi");
    fireEvent.click(screen.getByTestId("send-button"));
    const banner = await screen.findByTestId("error-banner");
    expect(banner).toHaveTextContent("Invalid request: metadata.type");
    expect(banner).toHaveTextContent(API_ERRORS.schema_violation.body.error.message);
  });

  it("a network failure says the API cannot be reached", async () => {
    vi.stubGlobal("fetch", vi.fn(() => Promise.reject(new TypeError("Failed to fetch"))));
    render(<Playground />);
    type("hi");
    fireEvent.click(screen.getByTestId("send-button"));
    expect(await screen.findByTestId("error-banner")).toHaveTextContent("Cannot reach the API");
  });

  it("an error event mid-stream keeps the text so far and shows the error", async () => {
    mockFetch({
      "/v1/chat/completions": () => sseResponse(sse([chatChunk("partial"), apiErrorEvent("timeout_mid_stream")], false)),
    });
    render(<Playground />);
    type("hi");
    fireEvent.click(screen.getByTestId("send-button"));
    expect(await screen.findByTestId("error-banner")).toHaveTextContent("Request timed out");
    expect(screen.getByTestId("reply")).toHaveTextContent("partial");
  });

  it("the dismiss button clears the banner", async () => {
    mockFetch({ "/v1/chat/completions": () => apiError("timeout") });
    render(<Playground />);
    type("hi");
    fireEvent.click(screen.getByTestId("send-button"));
    expect(await screen.findByTestId("error-banner")).toHaveTextContent("Request timed out");
    fireEvent.click(screen.getByRole("button", { name: "Dismiss error" }));
    expect(screen.queryByTestId("error-banner")).toBeNull();
  });
});

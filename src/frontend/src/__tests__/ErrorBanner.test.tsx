// The error banner against the API's real error answers (the fixture tests/test_errors.py captures
// from a running cluster) and against docs/api.md's table of reasons: the banner reads the body's
// fields, so these pin what each reason shows.
import { act, render, screen } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { ApiError, streamChat } from "../api";
import { ErrorBanner } from "../components/ErrorBanner";
import { REASONS } from "../errors";
import readme from "../../../../docs/api.md?raw";
import { API_ERRORS, apiError, apiErrorEvent, chatChunk, mockFetch, NOT_PROVOKED, sse, sseResponse, type ApiErrorCase } from "./helpers";

afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllGlobals();
});

const PARAMS = { model: "m", messages: [{ role: "user" as const, content: "hi" }], max_tokens: 8, temperature: 0, top_p: 1, top_k: 0, seed: null, stop: [] };

/** The error the playground gets for a captured case, through the real client code (api.ts). */
async function received(name: ApiErrorCase): Promise<unknown> {
  const c = API_ERRORS[name];
  mockFetch({
    "/v1/chat/completions": () =>
      c.status === 200 ? sseResponse(sse([chatChunk("partial"), apiErrorEvent(name)], false)) : apiError(name),
  });
  return streamChat(PARAMS).then(
    () => new Error("no error"),
    (e: unknown) => e,
  );
}

const retry = (name: ApiErrorCase) => API_ERRORS[name].body.error.retry_after_s;

// What each captured case must show; the fixture's own fields fill in what may change between runs.
const TITLES: Record<ApiErrorCase, () => string> = {
  cache_exhausted: () => `KV cache full on model part 0 (node node1), retry in ${retry("cache_exhausted")} s`,
  context_length_exceeded: () => "Prompt too long for the model's context",
  invalid_parameter: () => "Invalid value for prompt",
  method_not_allowed: () => "Method not allowed",
  model_refused: () => "The model refused this request",
  not_found: () => "Not found",
  queue_full: () => `Server busy, retry in ${retry("queue_full")} s`,
  request_too_large: () => "Request too large",
  schema_violation: () => "Invalid request: metadata.type",
  service_unavailable: () => "Service unreachable",
  stage_unavailable: () => "Model part 0 is down (node node1)",
  timeout: () => "Request timed out",
  timeout_mid_stream: () => "Request timed out",
  unauthorized: () => "API key required",
};

describe("the API's real error bodies", () => {
  it("cover every reason but those no client can provoke", () => {
    expect(Object.keys(TITLES).sort()).toEqual(Object.keys(API_ERRORS).sort());
    const provoked = new Set(Object.values(API_ERRORS).map((c) => c.body.error.code));
    expect([...provoked, ...NOT_PROVOKED].sort()).toEqual([...REASONS].sort());
  });

  it.each(Object.keys(API_ERRORS) as ApiErrorCase[])("%s: the banner shows its fields", async (name) => {
    const { body } = API_ERRORS[name];
    const err = await received(name);
    expect(err).toBeInstanceOf(ApiError);
    expect(err).toMatchObject({
      reason: body.error.code,
      status: body.error.status,
      part: body.error.part,
      node: body.error.node,
      param: body.error.param,
      retryAfterS: body.error.retry_after_s,
    });
    render(<ErrorBanner error={err} />);
    const banner = screen.getByTestId("error-banner");
    expect(banner).toHaveAttribute("data-reason", body.error.code);
    expect(banner).toHaveAttribute("data-part", body.error.part === null ? "" : String(body.error.part));
    expect(banner).toHaveAttribute("data-node", body.error.node ?? "");
    expect(banner.querySelector(".banner-title")).toHaveTextContent(TITLES[name]());
    expect(banner.querySelector(".banner-detail")).toHaveTextContent(body.error.message);
    const todo = readmeRows().get(body.error.code)?.todo.replace("{param}", body.error.param ?? "");
    expect(screen.getByTestId("error-banner-todo").textContent).toBe(todo);
  });

  it("counts the captured Retry-After down to zero", async () => {
    const err = await received("queue_full");
    const n = Number(retry("queue_full"));
    expect(n).toBeGreaterThanOrEqual(1);
    vi.useFakeTimers();
    render(<ErrorBanner error={err} />);
    const title = () => screen.getByTestId("error-banner").querySelector(".banner-title");
    for (let left = n; left > 0; left--) {
      expect(title()).toHaveTextContent(`Server busy, retry in ${left} s`);
      act(() => vi.advanceTimersByTime(1000));
    }
    expect(title()).toHaveTextContent("Server busy, you can retry now");
  });
});

interface Row {
  status: string;
  title: string;
  todo: string;
}

/** docs/api.md's table of reasons → HTTP status → UI title and line. */
function readmeRows(): Map<string, Row> {
  const rows = new Map<string, Row>();
  for (const line of readme.split("\n")) {
    const m = /^\| `([a-z_]+)` \| (\d{3}) \| [A-Z_]+ \| (.+?) \| (.+?) \|$/.exec(line);
    if (m !== null) rows.set(m[1]!, { status: m[2]!, title: m[3]!, todo: m[4]! });
  }
  return rows;
}

describe("docs/api.md's table of reasons", () => {
  it("lists every reason once", () => {
    expect([...readmeRows().keys()].sort()).toEqual([...REASONS].sort());
  });

  it.each([...REASONS])("%s: the banner shows the docs' title and line", (reason) => {
    const row = readmeRows().get(reason)!;
    const waits = row.title.includes("{n}");
    const fill = (t: string) => t.replace("{part}", "1").replace("{node}", "node2").replace("{param}", "temperature").replace("{n}", "3");
    const err = new ApiError("http", "the server's message", {
      status: Number(row.status),
      reason,
      part: 1,
      node: "node2",
      param: "temperature",
      retryAfterS: waits ? 3 : null,
    });
    render(<ErrorBanner error={err} />);
    expect(screen.getByTestId("error-banner").querySelector(".banner-title")?.textContent).toBe(fill(row.title));
    expect(screen.getByTestId("error-banner-todo").textContent).toBe(fill(row.todo));
  });
});

describe("fields, not text", () => {
  it("names the part and node from the fields, whatever the message says", () => {
    const err = new ApiError("http", "part 7 is down: node zz did not answer", { status: 503, reason: "stage_unavailable", part: 1, node: "node2" });
    render(<ErrorBanner error={err} />);
    expect(screen.getByTestId("error-banner").querySelector(".banner-title")).toHaveTextContent("Model part 1 is down (node node2)");
  });

  it("says a stage is down, no more, when the body names none", () => {
    render(<ErrorBanner error={new ApiError("http", "part 7 is down: node zz", { status: 503, reason: "stage_unavailable" })} />);
    expect(screen.getByTestId("error-banner").querySelector(".banner-title")).toHaveTextContent(/^A pipeline stage is down$/);
  });

  it("names every replica when all of a part's nodes are down", () => {
    render(<ErrorBanner error={new ApiError("http", "m", { status: 503, reason: "stage_unavailable", part: 1, node: "node2, node2b" })} />);
    expect(screen.getByTestId("error-banner")).toHaveTextContent("Model part 1 is down (nodes node2, node2b)");
  });

  it("shows a body of another shape by its status", () => {
    render(<ErrorBanner error={new ApiError("http", "Bad Gateway", { status: 502 })} />);
    expect(screen.getByTestId("error-banner")).toHaveTextContent("Server error (502)");
  });

  it("shows a plain Error too", () => {
    render(<ErrorBanner error={new Error("odd")} />);
    expect(screen.getByTestId("error-banner")).toHaveTextContent("Something went wrong");
    expect(screen.getByTestId("error-banner")).toHaveTextContent("odd");
  });
});

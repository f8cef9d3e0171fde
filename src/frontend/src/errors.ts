// Turns any failure into what the ErrorBanner shows, from the error's fields, never its text: a
// title naming the part and node that failed, the server's message as the detail, a "what to do"
// line per reason, and the seconds until a retry helps. The reasons are the API's `code` values
// (src/common/errors.py: Reason); docs/api.md's error table lists the same titles and lines.
import { ApiError } from "./api";

export const REASONS = [
  "invalid_parameter",
  "schema_violation",
  "context_length_exceeded",
  "model_refused",
  "unauthorized",
  "not_found",
  "unknown_request",
  "method_not_allowed",
  "request_too_large",
  "queue_full",
  "client_closed",
  "internal",
  "upstream_error",
  "stage_unavailable",
  "service_unavailable",
  "cache_exhausted",
  "timeout",
] as const;

export type Reason = (typeof REASONS)[number];

export type ErrorKind = "busy" | "unavailable" | "invalid" | "network" | "server" | "other";

export interface ErrorDescription {
  kind: ErrorKind;
  /** The API's reason, null for failures that never reached it (network, a plain Error). */
  reason: Reason | null;
  title: string;
  /** The message as the server (or the browser) gave it. */
  detail: string;
  /** What the user can do about it. */
  todo: string;
  /** Seconds until a retry makes sense, null when waiting does not help or none was given. */
  retryAfterS: number | null;
  part: number | null;
  node: string | null;
  param: string | null;
}

interface Fields {
  part: number | null;
  node: string | null;
  param: string | null;
}

/** " (node node2)", " (nodes node2, node2b)" when every replica of a part is down, or "". */
function nodes(node: string | null): string {
  if (node === null) return "";
  return node.includes(",") ? ` (nodes ${node})` : ` (node ${node})`;
}

const TEXT: Record<Reason, { kind: ErrorKind; title: (f: Fields) => string; todo: (f: Fields) => string }> = {
  invalid_parameter: {
    kind: "invalid",
    title: (f) => (f.param === null ? "Invalid request" : `Invalid value for ${f.param}`),
    todo: (f) => `Change ${f.param ?? "the request"} as the message says, then send again.`,
  },
  schema_violation: {
    kind: "invalid",
    title: (f) => (f.param === null ? "Invalid request" : `Invalid request: ${f.param}`),
    todo: (f) => `Fix ${f.param ?? "the body"} to match the API schema, then send again.`,
  },
  context_length_exceeded: {
    kind: "invalid",
    title: () => "Prompt too long for the model's context",
    todo: () => "Shorten the conversation or lower max tokens, then send again.",
  },
  model_refused: {
    kind: "invalid",
    title: () => "The model refused this request",
    todo: () => "Change the messages as the message says, or use completion mode.",
  },
  unauthorized: {
    kind: "other",
    title: () => "API key required",
    todo: () => "Send a valid API key (Authorization: Bearer <key>).",
  },
  not_found: { kind: "other", title: () => "Not found", todo: () => "Check the address of the endpoint." },
  unknown_request: {
    kind: "other",
    title: () => "Unknown request",
    todo: () => "The server no longer knows this request: send it again.",
  },
  method_not_allowed: { kind: "other", title: () => "Method not allowed", todo: () => "Use the method the message names." },
  request_too_large: {
    kind: "invalid",
    title: () => "Request too large",
    todo: () => "Send a shorter prompt (the limit is api.max_body_bytes).",
  },
  queue_full: {
    kind: "busy",
    title: () => "Server busy",
    todo: () => "Too many requests are waiting: send again when the countdown ends.",
  },
  client_closed: { kind: "other", title: () => "Request cancelled", todo: () => "Send it again if you still want the answer." },
  internal: {
    kind: "server",
    title: () => "Server error",
    todo: () => "Retry; if it happens again, report the message below.",
  },
  upstream_error: {
    kind: "server",
    title: () => "A service answered unexpectedly",
    todo: () => "Retry; if it persists, check the coordinator's and the nodes' logs.",
  },
  stage_unavailable: {
    kind: "unavailable",
    title: (f) => {
      if (f.part !== null) return `Model part ${f.part} is down${nodes(f.node)}`;
      if (f.node !== null) return `Node ${f.node} is down`;
      return "A pipeline stage is down";
    },
    todo: () => "Retry in a few seconds: a replica or the restarted node takes over. If not, restart the node.",
  },
  service_unavailable: {
    kind: "unavailable",
    title: () => "Service unreachable",
    todo: () => "Check that the coordinator and the tokenizer are running.",
  },
  cache_exhausted: {
    kind: "busy",
    title: (f) => (f.part === null ? `KV cache full${nodes(f.node)}` : `KV cache full on model part ${f.part}${nodes(f.node)}`),
    todo: () => "Retry when the countdown ends, or lower max tokens.",
  },
  timeout: {
    kind: "server",
    title: () => "Request timed out",
    todo: () => "Lower max tokens, or retry when the cluster is less busy.",
  },
};

export function isReason(value: string | null): value is Reason {
  return value !== null && (REASONS as readonly string[]).includes(value);
}

export function describeError(e: unknown): ErrorDescription {
  const none = { reason: null, retryAfterS: null, part: null, node: null, param: null };
  if (!(e instanceof ApiError)) {
    const msg = e instanceof Error ? e.message : String(e);
    return { ...none, kind: "other", title: "Something went wrong", detail: msg, todo: "Reload the page and try again." };
  }
  if (e.kind === "network") {
    return {
      ...none,
      kind: "network",
      title: "Cannot reach the API",
      detail: e.message,
      todo: "Check that the API is running (it listens on :8000).",
    };
  }
  const fields: Fields = { part: e.part, node: e.node, param: e.param };
  if (isReason(e.reason)) {
    const t = TEXT[e.reason];
    return {
      ...fields,
      kind: t.kind,
      reason: e.reason,
      title: t.title(fields),
      detail: e.message,
      todo: t.todo(fields),
      retryAfterS: e.retryAfterS,
    };
  }
  // Not the API's body (a proxy in between, or a newer server's reason): say what the status says.
  const base = { ...none, ...fields, detail: e.message, retryAfterS: e.retryAfterS };
  if (e.kind === "protocol") return { ...base, kind: "other", title: "Unexpected response from the API", todo: "Reload the page and try again." };
  if (e.status !== null && e.status >= 500) {
    return { ...base, kind: "server", title: `Server error (${e.status})`, todo: "Retry; if it happens again, check the API's logs." };
  }
  if (e.kind === "stream") return { ...base, kind: "server", title: "Generation failed", todo: "Send the request again." };
  return {
    ...base,
    kind: "other",
    title: e.status !== null ? `Request failed (${e.status})` : "Request failed",
    todo: "Check the request and send it again.",
  };
}

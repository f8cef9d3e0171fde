// Turns any failure into the headline and detail the ErrorBanner shows. 503 messages are searched
// for the model part and node that are down; the cluster's node ids, when known, make that exact.
import { ApiError } from "./api";

export type ErrorKind = "busy" | "unavailable" | "invalid" | "network" | "server" | "other";

export interface ErrorDescription {
  kind: ErrorKind;
  title: string;
  detail: string;
  /** For "busy": seconds until a retry makes sense, null when the server gave none. */
  retryAfterS: number | null;
  part: number | null;
  node: string | null;
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Finds "part 1" and a node id in a message such as "part 1 (node node2 at 10.0.0.2:50052) is down". */
export function findPartAndNode(message: string, knownNodeIds: readonly string[] = []): { part: number | null; node: string | null } {
  const partMatch = /\b(?:model[\s_]+)?part\s*(?:#|=|:)?\s*(\d+)/i.exec(message);
  const part = partMatch?.[1] !== undefined ? Number(partMatch[1]) : null;
  let node: string | null = null;
  for (const id of [...knownNodeIds].sort((a, b) => b.length - a.length)) {
    if (id !== "" && new RegExp(`(^|[^\\w.-])${escapeRe(id)}($|[^\\w-])`).test(message)) {
      node = id;
      break;
    }
  }
  if (node === null) {
    const patterns = [
      /\bnode(?:[_ ]id)?\s*[=:]\s*['"]?([\w.-]+)/i,
      /\bnode\s+['"`]([^'"`]+)['"`]/i,
      /\b(node[-_]?\d+)\b/i,
    ];
    for (const re of patterns) {
      const m = re.exec(message);
      if (m?.[1] !== undefined) {
        node = m[1];
        break;
      }
    }
  }
  return { part, node };
}

function looksUnavailable(e: ApiError): boolean {
  if (e.status === 503) return true;
  const tag = `${e.type ?? ""} ${String(e.code ?? "")}`.toLowerCase();
  return /unavailable|node_down|part_down/.test(tag);
}

export function describeError(e: unknown, knownNodeIds: readonly string[] = []): ErrorDescription {
  const base = { retryAfterS: null, part: null, node: null };
  if (!(e instanceof ApiError)) {
    const msg = e instanceof Error ? e.message : String(e);
    return { ...base, kind: "other", title: "Something went wrong", detail: msg };
  }
  if (e.kind === "network") {
    return { ...base, kind: "network", title: "Cannot reach the API", detail: `${e.message}. Is the API running on :8000?` };
  }
  if (e.status === 429) {
    return { ...base, kind: "busy", title: "Server busy", detail: e.message, retryAfterS: e.retryAfterS };
  }
  if (looksUnavailable(e)) {
    const { part, node } = findPartAndNode(e.message, knownNodeIds);
    let title = "Service unavailable";
    if (part !== null && node !== null) title = `Model part ${part} is down (node ${node})`;
    else if (part !== null) title = `Model part ${part} is down`;
    else if (node !== null) title = `Node ${node} is down`;
    return { kind: "unavailable", title, detail: e.message, retryAfterS: e.retryAfterS, part, node };
  }
  if (e.status === 400 || e.status === 422) {
    return { ...base, kind: "invalid", title: `Invalid request (${e.status})`, detail: e.message };
  }
  if (e.status !== null && e.status >= 500) {
    return { ...base, kind: "server", title: `Server error (${e.status})`, detail: e.message };
  }
  if (e.kind === "stream") return { ...base, kind: "server", title: "Generation failed", detail: e.message };
  if (e.kind === "protocol") return { ...base, kind: "other", title: "Unexpected response from the API", detail: e.message };
  return { ...base, kind: "other", title: e.status !== null ? `Request failed (${e.status})` : "Request failed", detail: e.message };
}

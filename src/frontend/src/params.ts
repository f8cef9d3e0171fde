// The playground's sampling controls as the user types them (strings), their defaults, and the
// conversion to the API's SamplingParams. Range checks are left to the API, whose 400/422 message
// is shown as-is; here we only reject what cannot be sent at all (not a number).
import type { SamplingParams } from "./api";

export interface ControlValues {
  maxTokens: string;
  temperature: string;
  topP: string;
  topK: string;
  /** Empty = random. */
  seed: string;
  /** Comma or newline separated; \n, \t, \, and \\ are escapes. */
  stop: string;
}

export const DEFAULT_CONTROLS: ControlValues = {
  maxTokens: "128",
  temperature: "0.7",
  topP: "1.0",
  topK: "0",
  seed: "",
  stop: "",
};

const ESCAPES: Record<string, string> = { n: "\n", t: "\t", ",": ",", "\\": "\\" };

/** Splits on commas and newlines; trims each item; `\n`, `\t`, `\,`, `\\` are escapes. */
export function parseStopSequences(text: string): string[] {
  const out: string[] = [];
  let cur = "";
  const push = (): void => {
    // Trim only real whitespace typed around separators, not escaped whitespace.
    const item = cur.replace(/^[ \u00a0]+|[ \u00a0]+$/g, "");
    if (item !== "") out.push(item);
    cur = "";
  };
  for (let i = 0; i < text.length; i++) {
    const c = text[i] ?? "";
    if (c === "\\" && i + 1 < text.length) {
      const next = text[i + 1] ?? "";
      const esc = ESCAPES[next];
      if (esc !== undefined) {
        cur += esc;
        i++;
        continue;
      }
    }
    if (c === "," || c === "\n" || c === "\r") push();
    else cur += c;
  }
  push();
  return out;
}

export type ParseResult = { ok: true; params: SamplingParams } | { ok: false; errors: Partial<Record<keyof ControlValues, string>> };

export function parseControls(v: ControlValues): ParseResult {
  const errors: Partial<Record<keyof ControlValues, string>> = {};
  const num = (key: keyof ControlValues, integer: boolean): number => {
    const s = v[key].trim();
    const n = Number(s);
    if (s === "" || !Number.isFinite(n)) errors[key] = "must be a number";
    else if (integer && !Number.isInteger(n)) errors[key] = "must be a whole number";
    return n;
  };
  const max_tokens = num("maxTokens", true);
  const temperature = num("temperature", false);
  const top_p = num("topP", false);
  const top_k = num("topK", true);
  const seed = v.seed.trim() === "" ? null : num("seed", true);
  if (Object.keys(errors).length > 0) return { ok: false, errors };
  return { ok: true, params: { max_tokens, temperature, top_p, top_k, seed, stop: parseStopSequences(v.stop) } };
}

// Stats under a reply: time to first token, decode rate, token count, tokens per pass through the
// pipeline (speculative decoding), finish reason and the route (which node served each model part).
// Server timings (pipeserve extension) win over client ones.
import type { StreamResult } from "../api";
import { formatMs } from "../format";

export type ReplyStatus = "streaming" | "done" | "cancelled" | "error";

interface Props {
  status: ReplyStatus;
  /** Text chunks seen so far, shown while streaming. */
  liveTokens: number;
  result: StreamResult | null;
}

export interface DerivedStats {
  ttftMs: number | null;
  totalMs: number;
  tokens: number;
  /** Decode rate: tokens after the first over the time after the first. */
  tokensPerS: number | null;
}

export function deriveStats(r: StreamResult): DerivedStats {
  const ttftMs = r.pipeserve?.ttft_ms ?? r.clientTtftMs;
  const totalMs = r.pipeserve?.total_ms ?? r.clientTotalMs;
  const tokens = r.usage?.completion_tokens ?? r.textChunks;
  let tokensPerS: number | null = null;
  if (tokens > 1 && ttftMs !== null && totalMs > ttftMs) tokensPerS = ((tokens - 1) * 1000) / (totalMs - ttftMs);
  else if (tokens > 0 && totalMs > 0) tokensPerS = (tokens * 1000) / totalMs;
  return { ttftMs, totalMs, tokens, tokensPerS };
}

export function ReplyStats({ status, liveTokens, result }: Props) {
  if (status === "streaming" || result === null) {
    return (
      <div className="reply-stats" data-testid="reply-stats" aria-live="polite">
        <span>{status === "streaming" ? "streaming…" : status === "cancelled" ? "" : status}</span>
        <span>
          {liveTokens} token{liveTokens === 1 ? "" : "s"}
        </span>
        {status === "cancelled" && (
          <span className="pill pill-finish finish-cancelled" data-testid="finish-reason">
            cancelled
          </span>
        )}
      </div>
    );
  }
  const s = deriveStats(result);
  const finish = result.aborted ? "cancelled" : (result.finishReason ?? status);
  return (
    <div className="reply-stats" data-testid="reply-stats">
      <span title="time to first token">
        TTFT <b data-testid="stat-ttft">{formatMs(s.ttftMs)}</b>
      </span>
      <span title="decode rate: tokens after the first / time after the first">
        <b data-testid="stat-tps">{s.tokensPerS === null ? "–" : s.tokensPerS.toFixed(1)}</b> tok/s
      </span>
      <span>
        <b data-testid="stat-tokens">{s.tokens}</b> tokens
      </span>
      <span title="total time">{formatMs(s.totalMs)}</span>
      {result.pipeserve?.speculative && result.pipeserve.speculative.passes > 0 && (
        <span
          title={`speculative decoding: ${result.pipeserve.speculative.accepted} of ${result.pipeserve.speculative.drafted} drafts accepted`}
        >
          <b data-testid="stat-tokens-per-pass">{result.pipeserve.speculative.tokens_per_pass.toFixed(2)}</b> tok/pass
        </span>
      )}
      <span className={`pill pill-finish finish-${finish}`} data-testid="finish-reason">
        {finish}
      </span>
      {result.pipeserve && result.pipeserve.route.length > 0 && (
        <span className="route" data-testid="reply-route" title="which node served each model part">
          {[...result.pipeserve.route]
            .sort((a, b) => a.part - b.part)
            .map((h) => (
              <span key={`${h.part}-${h.node_id}`} className="hop" title={h.address}>
                {h.part}:{h.node_id}
              </span>
            ))}
        </span>
      )}
    </div>
  );
}

// One error, said plainly: what failed and what to do. 429 counts down the server's Retry-After;
// 503 names the model part / node that is down.
import { useEffect, useState } from "react";
import { describeError } from "../errors";

interface Props {
  error: unknown;
  /** Node ids from the last cluster poll, to name the node in a 503 exactly. */
  knownNodeIds?: readonly string[];
  onDismiss?: () => void;
  testId?: string;
}

export function ErrorBanner({ error, knownNodeIds = [], onDismiss, testId = "error-banner" }: Props) {
  const d = describeError(error, knownNodeIds);
  const remaining = useCountdown(d.kind === "busy" ? d.retryAfterS : null, error);

  let title = d.title;
  if (d.kind === "busy") {
    if (d.retryAfterS === null) title = "Server busy, retry shortly";
    else if (remaining !== null && remaining > 0) title = `Server busy, retry in ${remaining} s`;
    else title = "Server busy, you can retry now";
  }

  return (
    <div className={`banner banner-${d.kind}`} role="alert" data-testid={testId} data-kind={d.kind}>
      <div className="banner-text">
        <strong className="banner-title">{title}</strong>
        {d.detail !== "" && d.detail !== title && <span className="banner-detail">{d.detail}</span>}
      </div>
      {onDismiss && (
        <button type="button" className="banner-close" onClick={onDismiss} aria-label="Dismiss error">
          ×
        </button>
      )}
    </div>
  );
}

/** Seconds left, ticking once a second; restarts when `key` (the error) changes. */
function useCountdown(seconds: number | null, key: unknown): number | null {
  const [left, setLeft] = useState(seconds);
  useEffect(() => {
    setLeft(seconds);
    if (seconds === null || seconds <= 0) return;
    const started = Date.now();
    const id = setInterval(() => {
      const l = Math.max(0, seconds - Math.floor((Date.now() - started) / 1000));
      setLeft(l);
      if (l === 0) clearInterval(id);
    }, 1000);
    return () => clearInterval(id);
  }, [seconds, key]);
  return left;
}

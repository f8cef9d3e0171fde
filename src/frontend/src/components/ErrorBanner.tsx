// One error, said plainly, from the error's fields: what failed (the model part and node when the
// API names them), the server's message, what to do, and a countdown of the server's Retry-After.
import { useEffect, useState } from "react";
import { describeError } from "../errors";

interface Props {
  error: unknown;
  onDismiss?: () => void;
  testId?: string;
}

export function ErrorBanner({ error, onDismiss, testId = "error-banner" }: Props) {
  const d = describeError(error);
  const remaining = useCountdown(d.retryAfterS, error);

  let title = d.title;
  if (d.retryAfterS !== null) {
    title += remaining !== null && remaining > 0 ? `, retry in ${remaining} s` : ", you can retry now";
  }

  return (
    <div
      className={`banner banner-${d.kind}`}
      role="alert"
      data-testid={testId}
      data-kind={d.kind}
      data-reason={d.reason ?? ""}
      data-part={d.part ?? ""}
      data-node={d.node ?? ""}
    >
      <div className="banner-text">
        <strong className="banner-title">{title}</strong>
        {d.detail !== "" && d.detail !== d.title && <span className="banner-detail">{d.detail}</span>}
        <span className="banner-todo" data-testid={`${testId}-todo`}>
          {d.todo}
        </span>
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

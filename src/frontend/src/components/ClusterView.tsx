// Live view of the cluster: polls GET /api/cluster (next poll starts when the last one ends) and
// shows readiness, the pipeline diagram, the coordinator/tokenizer cards and one card per node in
// pipeline order. When a poll fails the last data stays on screen, greyed, under the error.
import { useEffect, useRef, useState } from "react";
import { ApiError, fetchCluster, isAbortError, type ClusterStatus } from "../api";
import { ErrorBanner } from "./ErrorBanner";
import { NodeCard } from "./NodeCard";
import { PipelineDiagram } from "./PipelineDiagram";
import { CoordinatorCard, TokenizerCard } from "./ServiceCards";

interface Props {
  intervalMs?: number;
  /** Each successful poll, so other views can name nodes. */
  onStatus?: (cluster: ClusterStatus) => void;
}

interface PollState {
  cluster: ClusterStatus | null;
  /** Node ids whose forwards_total increased since the previous poll. */
  active: ReadonlySet<string>;
  error: unknown;
  updatedAt: number | null;
}

export function ClusterView({ intervalMs = 1000, onStatus }: Props) {
  const [state, setState] = useState<PollState>({ cluster: null, active: new Set(), error: null, updatedAt: null });
  const onStatusRef = useRef(onStatus);
  onStatusRef.current = onStatus;

  useEffect(() => {
    let stopped = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let ctrl: AbortController | null = null;
    let prev = new Map<string, number>();
    // A hung API must not stall the view: give each poll a deadline.
    const deadlineMs = Math.max(5000, intervalMs * 5);

    const poll = async (): Promise<void> => {
      ctrl = new AbortController();
      const mine = ctrl;
      const deadline = setTimeout(() => mine.abort(), deadlineMs);
      try {
        const cluster = await fetchCluster(mine.signal);
        if (stopped) return;
        const nodes = Array.isArray(cluster.nodes) ? cluster.nodes : [];
        const active = new Set(
          nodes.filter((n) => n.forwards_total > (prev.get(n.id) ?? Infinity)).map((n) => n.id),
        );
        prev = new Map(nodes.map((n) => [n.id, n.forwards_total]));
        setState({ cluster: { ...cluster, nodes }, active, error: null, updatedAt: Date.now() });
        onStatusRef.current?.(cluster);
      } catch (e) {
        if (stopped) return;
        const error = isAbortError(e) ? new ApiError("network", `No answer from /api/cluster within ${deadlineMs / 1000} s`) : e;
        setState((s) => ({ ...s, active: new Set(), error }));
      } finally {
        clearTimeout(deadline);
        if (!stopped) timer = setTimeout(() => void poll(), intervalMs);
      }
    };
    void poll();
    return () => {
      stopped = true;
      clearTimeout(timer);
      ctrl?.abort();
    };
  }, [intervalMs]);

  const { cluster, active, error } = state;
  const nodes = cluster ? [...cluster.nodes].sort((a, b) => a.part - b.part || a.id.localeCompare(b.id)) : [];
  const down = nodes.filter((n) => !n.healthy);

  return (
    <section className="panel cluster" data-testid="cluster-view" aria-labelledby="cluster-title" aria-busy={cluster === null && error === null}>
      <header className="panel-head">
        <h2 id="cluster-title">Cluster</h2>
        {cluster && (
          <span className={`pill ${cluster.ready ? "pill-ok" : "pill-bad"}`} data-testid="cluster-ready" data-ready={String(cluster.ready)}>
            {cluster.ready ? "ready" : "not ready"}
          </span>
        )}
        {cluster && (
          <span className="muted small model-info" data-testid="cluster-model">
            {cluster.model.name} · {cluster.model.arch} · {cluster.model.n_layers} layers
            {cluster.model.checksum && <span className="mono" title={cluster.model.checksum}> · {cluster.model.checksum.slice(0, 12)}</span>}
          </span>
        )}
      </header>

      {error !== null && <ErrorBanner error={error} testId="cluster-error" />}
      {cluster === null && error === null && <p className="muted">Loading cluster status…</p>}

      {cluster && (
        <div className={error !== null ? "stale" : undefined}>
          {down.length > 0 && (
            <div className="banner banner-unavailable" role="alert" data-testid="nodes-down">
              <strong className="banner-title">
                {down.length === 1 ? "Node down: " : `${down.length} nodes down: `}
                {down.map((n) => `${n.id} (part ${n.part})`).join(", ")}
              </strong>
            </div>
          )}
          {cluster.problems.length > 0 && (
            <ul className="problems" data-testid="cluster-problems">
              {cluster.problems.map((p, i) => (
                <li key={i}>{p}</li>
              ))}
            </ul>
          )}
          <PipelineDiagram cluster={cluster} activeNodeIds={active} />
          <div className="cards">
            {nodes.map((n) => (
              <NodeCard key={n.id} node={n} nLayers={cluster.model.n_layers} active={active.has(n.id)} />
            ))}
            <CoordinatorCard c={cluster.coordinator} />
            <TokenizerCard t={cluster.tokenizer} />
          </div>
        </div>
      )}
    </section>
  );
}

// Page layout: the playground beside the live cluster view (stacked on narrow screens). The cluster
// view's node ids are handed to the playground so a 503 names the node that is down.
import { useCallback, useState } from "react";
import type { ClusterStatus } from "./api";
import { ClusterView } from "./components/ClusterView";
import { Playground } from "./components/Playground";

export function App() {
  const [nodeIds, setNodeIds] = useState<readonly string[]>([]);
  const onStatus = useCallback((c: ClusterStatus) => {
    setNodeIds((prev) => {
      const next = c.nodes.map((n) => n.id);
      return prev.length === next.length && prev.every((id, i) => id === next[i]) ? prev : next;
    });
  }, []);

  return (
    <div className="app">
      <header className="topbar">
        <h1>
          pipe<span>serve</span>
        </h1>
        <span className="muted small">pipeline-parallel LLM serving</span>
        <a className="small" href="/metrics" target="_blank" rel="noreferrer">
          metrics
        </a>
      </header>
      <main className="layout">
        <Playground knownNodeIds={nodeIds} />
        <ClusterView onStatus={onStatus} />
      </main>
    </div>
  );
}

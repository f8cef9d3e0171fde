// Page layout: the playground beside the live cluster view (stacked on narrow screens). Errors
// carry their part and node as data (the API's error body), so the two need not share state.
import { ClusterView } from "./components/ClusterView";
import { Playground } from "./components/Playground";

export function App() {
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
        <Playground />
        <ClusterView />
      </main>
    </div>
  );
}

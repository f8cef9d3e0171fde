// Cards for the two non-model services: the coordinator (scheduler queue) and the tokenizer.
import type { ClusterStatus } from "../api";
import { formatCount } from "../format";
import { Meter } from "./Meter";

function Health({ healthy }: { healthy: boolean }) {
  return <span className={`pill ${healthy ? "pill-ok" : "pill-bad"}`}>{healthy ? "healthy" : "DOWN"}</span>;
}

export function CoordinatorCard({ c }: { c: ClusterStatus["coordinator"] }) {
  return (
    <article className={`card${c.healthy ? "" : " is-down"}`} data-testid="coordinator-card" data-healthy={String(c.healthy)}>
      <header className="card-head">
        <span className="card-title">coordinator</span>
        <Health healthy={c.healthy} />
      </header>
      <div className="muted mono small">{c.address}</div>
      <dl className="stats">
        <dt>running</dt>
        <dd>
          <Meter value={c.running} max={c.max_running} />
          <span className="small">
            {formatCount(c.running)} / {formatCount(c.max_running)}
          </span>
        </dd>
        <dt>waiting</dt>
        <dd>
          <Meter value={c.waiting} max={c.max_waiting} />
          <span className="small">
            {formatCount(c.waiting)} / {formatCount(c.max_waiting)}
          </span>
        </dd>
        <dt>micro-batches</dt>
        <dd title={c.micro_batches_reason || undefined}>{formatCount(c.micro_batches)}</dd>
      </dl>
    </article>
  );
}

export function TokenizerCard({ t }: { t: ClusterStatus["tokenizer"] }) {
  return (
    <article className={`card${t.healthy ? "" : " is-down"}`} data-testid="tokenizer-card" data-healthy={String(t.healthy)}>
      <header className="card-head">
        <span className="card-title">tokenizer</span>
        <Health healthy={t.healthy} />
      </header>
      <div className="muted mono small">{t.address}</div>
      {t.error && <div className="node-error">{t.error}</div>}
      <dl className="stats">
        <dt>vocab</dt>
        <dd>{formatCount(t.vocab_size)}</dd>
      </dl>
    </article>
  );
}

// One model node: its slice of the model, health, load, cache, memory budget and timings from
// GET /api/cluster.
import type { NodeStatus } from "../api";
import { formatBytes, formatCount, formatLayers, formatMs } from "../format";
import { Meter } from "./Meter";

interface Props {
  node: NodeStatus;
  nLayers: number;
  /** forwards_total went up since the previous poll. */
  active: boolean;
}

export function NodeCard({ node, nLayers, active }: Props) {
  const [start, end] = node.layers;
  const span = Math.max(1, nLayers);
  return (
    <article
      className={`card node-card${node.healthy ? "" : " is-down"}${active ? " is-active" : ""}`}
      data-testid={`node-card-${node.id}`}
      data-healthy={String(node.healthy)}
      data-active={String(active)}
      aria-label={`Node ${node.id}, part ${node.part}, ${node.healthy ? "healthy" : "down"}`}
    >
      <header className="card-head">
        <span className="card-title">{node.id}</span>
        <span className="tag">part {node.part}</span>
        <span className={`pill ${node.healthy ? "pill-ok" : "pill-bad"}`}>{node.healthy ? "healthy" : "DOWN"}</span>
      </header>
      <div className="muted mono small">{node.address}</div>
      {!node.healthy && node.error && (
        <div className="node-error" role="status">
          {node.error}
        </div>
      )}
      <div className="layer-bar" title={`layers ${formatLayers(node.layers)} of ${nLayers}`}>
        <span style={{ left: `${(start / span) * 100}%`, width: `${((end - start) / span) * 100}%` }} />
      </div>
      <dl className="stats">
        <dt>layers</dt>
        <dd className="mono">
          {formatLayers(node.layers)} <span className="muted">({end - start})</span>
        </dd>
        <dt>in flight</dt>
        <dd>{formatCount(node.requests_in_flight)}</dd>
        <dt>cache</dt>
        <dd>
          <Meter value={node.cache_used_tokens} max={node.cache_budget_tokens} />
          <span className="small">
            {formatCount(node.cache_used_tokens)} / {formatCount(node.cache_budget_tokens)} tok
          </span>
        </dd>
        <dt>prefix cache</dt>
        <dd className="small" title={`${node.prefix_cached_blocks} cached blocks of ${node.cache_block_size} tokens`}>
          {formatCount(node.prefix_cached_blocks)} blocks · {formatCount(node.prefix_hit_tokens)} tok hit
        </dd>
        <dt>memory</dt>
        <dd>
          {formatBytes(node.rss_bytes)}{" "}
          <span className="muted" title="KV-cache pages in memory (blocks written so far)">
            {formatBytes(node.cache_resident_bytes ?? 0)} KV
          </span>
        </dd>
        {node.memory && (
          <>
            <dt>budget</dt>
            <dd
              data-testid={`node-budget-${node.id}`}
              title={`${node.memory.limit_reason}; share: weights ${formatBytes(node.memory.weights_bytes)} + KV pool ${formatBytes(node.memory.kv_bytes)} + runtime ${formatBytes(node.memory.runtime_bytes)}`}
            >
              <Meter value={node.memory.need_bytes} max={node.memory.limit_bytes} />
              <span className="small">
                {formatBytes(node.memory.need_bytes)} of {formatBytes(node.memory.limit_bytes)}{" "}
                <span className="muted">
                  ({node.memory.limit_source}) · {formatBytes(node.memory.left_bytes)} left
                </span>
              </span>
            </dd>
          </>
        )}
        <dt>weights</dt>
        <dd title={Object.entries(node.weight_types ?? {}).map(([t, n]) => `${n} ${t}`).join(", ")}>
          {formatBytes(node.weights_bytes)}{" "}
          <span className="muted" title={node.threads_reason || undefined}>{Object.keys(node.weight_types ?? {}).join(" ")}{node.kernel ? ` · ${node.kernel}` : ""}</span>
          {node.load_s != null && <span className="muted"> · loaded in {formatMs(node.load_s * 1000)}</span>}
        </dd>
        <dt>forward</dt>
        <dd>
          {formatMs(node.last_forward_ms)} <span className="muted">last</span> · {formatMs(node.mean_forward_ms)}{" "}
          <span className="muted">mean</span>
        </dd>
        <dt>forwards</dt>
        <dd>{formatCount(node.forwards_total)}</dd>
      </dl>
    </article>
  );
}

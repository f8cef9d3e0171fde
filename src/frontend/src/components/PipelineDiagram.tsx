// The request path: tokenizer → part 0 → … → part N-1. A stage lights up when any of its nodes'
// forwards_total grew since the previous poll, and turns red when none of its nodes is healthy.
import type { ClusterStatus, NodeStatus } from "../api";
import { formatLayers } from "../format";

interface Props {
  cluster: ClusterStatus;
  activeNodeIds: ReadonlySet<string>;
}

export function PipelineDiagram({ cluster, activeNodeIds }: Props) {
  const parts = new Map<number, NodeStatus[]>();
  for (const n of cluster.nodes) parts.set(n.part, [...(parts.get(n.part) ?? []), n]);
  const stages = [...parts.entries()].sort(([a], [b]) => a - b);

  return (
    <ol className="pipeline" aria-label="Pipeline" data-testid="pipeline">
      <li className={`stage stage-svc${cluster.tokenizer.healthy ? "" : " is-down"}`} data-testid="stage-tokenizer">
        <span className="stage-name">tokenizer</span>
      </li>
      {stages.map(([part, nodes]) => {
        const healthy = nodes.some((n) => n.healthy);
        const active = nodes.some((n) => activeNodeIds.has(n.id));
        const first = nodes[0];
        return (
          <li
            key={part}
            className={`stage${healthy ? "" : " is-down"}${active ? " is-active" : ""}`}
            data-testid={`stage-${part}`}
            data-healthy={String(healthy)}
            data-active={String(active)}
            title={nodes.map((n) => `${n.id} ${n.address}${n.healthy ? "" : " (down)"}`).join("\n")}
          >
            <span className="stage-name">part {part}</span>
            <span className="stage-nodes">{nodes.map((n) => n.id).join(", ")}</span>
            {first && <span className="stage-layers mono">{formatLayers(first.layers)}</span>}
          </li>
        );
      })}
    </ol>
  );
}

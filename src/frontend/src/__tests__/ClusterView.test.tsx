import { render, screen, waitFor, within } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { ClusterStatus } from "../api";
import { ClusterView } from "../components/ClusterView";
import { apiError, cluster, jsonResponse, mockFetch, node } from "./helpers";

afterEach(() => {
  vi.unstubAllGlobals();
});

describe("ClusterView", () => {
  it("renders every node in pipeline order with its part, layers, cache, memory and timings", async () => {
    // Out of order on the wire: the view sorts by part.
    const c = cluster([node("node3", 2, [20, 30]), node("node1", 0, [0, 10]), node("node2", 1, [10, 20], { requests_in_flight: 2 })]);
    mockFetch({ "/api/cluster": () => jsonResponse(c) });
    render(<ClusterView />);

    const view = screen.getByTestId("cluster-view");
    await within(view).findByTestId("node-card-node1");
    const cards = within(view).getAllByTestId(/^node-card-/);
    expect(cards.map((el) => el.dataset.testid)).toEqual(["node-card-node1", "node-card-node2", "node-card-node3"]);

    const n2 = screen.getByTestId("node-card-node2");
    expect(n2).toHaveAttribute("data-healthy", "true");
    expect(n2).toHaveTextContent("part 1");
    expect(n2).toHaveTextContent("[10, 20)");
    expect(n2).toHaveTextContent("96 / 4,096 tok");
    expect(n2).toHaveTextContent("12 blocks · 320 tok hit");
    expect(n2).toHaveTextContent("512 MiB");
    expect(n2).toHaveTextContent("24.0 MiB KV");
    expect(n2).toHaveTextContent("12.5 ms last");
    expect(n2).toHaveTextContent("10.3 ms mean");
    expect(within(n2).getByText("in flight").nextElementSibling).toHaveTextContent("2");

    expect(screen.getByTestId("cluster-ready")).toHaveTextContent("ready");
    expect(screen.getByTestId("coordinator-card")).toHaveTextContent("1 / 8");
    expect(within(n2).getByText(/avx2 x1/)).toHaveAttribute("title", "auto: 2 cores (affinity) / 1 node computing at once");
    expect(within(screen.getByTestId("coordinator-card")).getByText("micro-batches").nextElementSibling).toHaveAttribute(
      "title",
      "all 3 nodes on one host",
    );
    expect(screen.getByTestId("tokenizer-card")).toHaveTextContent("49,152");
    expect(screen.getByTestId("cluster-model")).toHaveTextContent("smollm2-135m · llama · 30 layers");
    expect(screen.getByTestId("stage-0")).toHaveTextContent("node1");
    expect(screen.queryByTestId("nodes-down")).toBeNull();
  });

  it("shows each node's memory limit, what its share takes and what is left", async () => {
    const MiB = 1024 * 1024;
    const memory = {
      limit_bytes: 2048 * MiB,
      limit_source: "cgroup" as const,
      limit_reason: "auto: cgroup v2 memory.max of /: 2.00 GiB",
      weights_bytes: 1024 * MiB,
      kv_bytes: 256 * MiB,
      runtime_bytes: 192 * MiB,
      need_bytes: 1472 * MiB,
      left_bytes: 576 * MiB,
    };
    const c = cluster([node("node1", 0, [0, 15], { memory, load_s: 1.25 }), node("node2", 1, [15, 30])]);
    mockFetch({ "/api/cluster": () => jsonResponse(c) });
    render(<ClusterView />);

    const budget = await screen.findByTestId("node-budget-node1");
    expect(budget).toHaveTextContent("1.4 GiB of 2.0 GiB (cgroup) · 576 MiB left");
    expect(budget).toHaveAttribute(
      "title",
      "auto: cgroup v2 memory.max of /: 2.00 GiB; share: weights 1.0 GiB + KV pool 256 MiB + runtime 192 MiB",
    );
    expect(within(budget).getByRole("meter")).toHaveAttribute("aria-valuenow", String(1472 * MiB));
    expect(screen.getByTestId("node-card-node1")).toHaveTextContent("loaded in 1250 ms");
    // a node that reports no budget (an older node, or still loading) shows none
    expect(screen.queryByTestId("node-budget-node2")).toBeNull();
  });

  it("marks a dead node red and names it", async () => {
    const c = cluster(
      [
        node("node1", 0, [0, 10]),
        node("node2", 1, [10, 20], { healthy: false, error: "connection refused (127.0.0.1:50052)" }),
        node("node3", 2, [20, 30]),
      ],
      { problems: ["part 1 has no healthy node"] },
    );
    mockFetch({ "/api/cluster": () => jsonResponse(c) });
    render(<ClusterView />);

    const dead = await screen.findByTestId("node-card-node2");
    expect(dead).toHaveAttribute("data-healthy", "false");
    expect(dead).toHaveClass("is-down");
    expect(dead).toHaveTextContent("DOWN");
    expect(dead).toHaveTextContent("connection refused");
    expect(screen.getByTestId("node-card-node1")).toHaveAttribute("data-healthy", "true");
    expect(screen.getByTestId("nodes-down")).toHaveTextContent("Node down: node2 (part 1)");
    expect(screen.getByTestId("stage-1")).toHaveAttribute("data-healthy", "false");
    expect(screen.getByTestId("cluster-ready")).toHaveTextContent("not ready");
    expect(screen.getByTestId("cluster-problems")).toHaveTextContent("part 1 has no healthy node");
  });

  it("lights a stage up when its forwards_total grows between polls", async () => {
    let tick = 0;
    const statuses: ClusterStatus[] = [
      cluster([node("node1", 0, [0, 15], { forwards_total: 5 }), node("node2", 1, [15, 30], { forwards_total: 5 })]),
      cluster([node("node1", 0, [0, 15], { forwards_total: 9 }), node("node2", 1, [15, 30], { forwards_total: 5 })]),
    ];
    mockFetch({ "/api/cluster": () => jsonResponse(statuses[Math.min(tick++, statuses.length - 1)]) });
    render(<ClusterView intervalMs={20} />);

    await screen.findByTestId("stage-0");
    expect(screen.getByTestId("stage-0")).toHaveAttribute("data-active", "false");
    await waitFor(() => expect(screen.getByTestId("stage-0")).toHaveAttribute("data-active", "true"));
    expect(screen.getByTestId("stage-1")).toHaveAttribute("data-active", "false");
    expect(screen.getByTestId("node-card-node1")).toHaveAttribute("data-active", "true");
    // No further change: it goes dark again.
    await waitFor(() => expect(screen.getByTestId("stage-0")).toHaveAttribute("data-active", "false"));
  });

  it("keeps the last data, greyed, under an error when a poll fails", async () => {
    let fail = false;
    mockFetch({
      "/api/cluster": () => (fail ? apiError("service_unavailable") : jsonResponse(cluster([node("node1", 0, [0, 30])]))),
    });
    render(<ClusterView intervalMs={20} />);
    await screen.findByTestId("node-card-node1");
    fail = true;
    expect(await screen.findByTestId("cluster-error")).toHaveTextContent("Service unreachable");
    expect(screen.getByTestId("node-card-node1")).toBeInTheDocument();
    fail = false;
    await waitFor(() => expect(screen.queryByTestId("cluster-error")).toBeNull());
  });

  it("says so when the API cannot be reached at all", async () => {
    vi.stubGlobal("fetch", vi.fn(() => Promise.reject(new TypeError("Failed to fetch"))));
    render(<ClusterView />);
    expect(await screen.findByTestId("cluster-error")).toHaveTextContent("Cannot reach the API");
  });
});

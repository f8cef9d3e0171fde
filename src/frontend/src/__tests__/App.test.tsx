import { fireEvent, render, screen } from "@testing-library/react";
import { afterEach, expect, it, vi } from "vitest";
import { App } from "../App";
import { API_ERRORS, apiError, cluster, jsonResponse, mockFetch, node } from "./helpers";

afterEach(() => {
  vi.unstubAllGlobals();
});

it("shows the playground and the cluster, and the API's 503 names the part and node that are down", async () => {
  const down = API_ERRORS.stage_unavailable.body.error; // captured from a cluster whose node1 was stopped
  mockFetch({
    "/api/cluster": () => jsonResponse(cluster([node("node1", 0, [0, 30], { healthy: false, error: "UNAVAILABLE: connection refused" })])),
    "/v1/chat/completions": () => apiError("stage_unavailable"),
  });
  render(<App />);
  expect(await screen.findByTestId("node-card-node1")).toHaveAttribute("data-healthy", "false");
  expect(screen.getByTestId("mode-chat")).toHaveAttribute("aria-selected", "true");

  fireEvent.change(screen.getByTestId("prompt-input"), { target: { value: "hi" } });
  fireEvent.click(screen.getByTestId("send-button"));
  const banner = await screen.findByTestId("error-banner");
  expect(down).toMatchObject({ code: "stage_unavailable", part: 0, node: "node1" });
  expect(banner).toHaveTextContent("Model part 0 is down (node node1)");
  expect(banner).toHaveTextContent(down.message);
  expect(screen.getByTestId("error-banner-todo")).toHaveTextContent("a replica or the restarted node takes over");
});

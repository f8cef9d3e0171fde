import { fireEvent, render, screen } from "@testing-library/react";
import { afterEach, expect, it, vi } from "vitest";
import { App } from "../App";
import { cluster, errorResponse, jsonResponse, mockFetch, node } from "./helpers";

afterEach(() => {
  vi.unstubAllGlobals();
});

it("shows the playground and the cluster, and a 503 names the dead node the cluster reports", async () => {
  mockFetch({
    "/api/cluster": () =>
      jsonResponse(cluster([node("alpha", 0, [0, 15]), node("beta", 1, [15, 30], { healthy: false, error: "deadline exceeded" })])),
    "/v1/chat/completions": () => errorResponse(503, "pipeline stage unavailable: beta did not answer within 5 s"),
  });
  render(<App />);
  expect(await screen.findByTestId("node-card-beta")).toHaveAttribute("data-healthy", "false");
  expect(screen.getByTestId("mode-chat")).toHaveAttribute("aria-selected", "true");

  fireEvent.change(screen.getByTestId("prompt-input"), { target: { value: "hi" } });
  fireEvent.click(screen.getByTestId("send-button"));
  expect(await screen.findByTestId("error-banner")).toHaveTextContent("Node beta is down");
});

import { act, render, screen } from "@testing-library/react";
import { afterEach, expect, it, vi } from "vitest";
import { ApiError } from "../api";
import { ErrorBanner } from "../components/ErrorBanner";

afterEach(() => {
  vi.useRealTimers();
});

it("counts the 429 Retry-After down to zero", () => {
  vi.useFakeTimers();
  render(<ErrorBanner error={new ApiError("http", "busy", { status: 429, retryAfterS: 2 })} />);
  expect(screen.getByTestId("error-banner")).toHaveTextContent("busy, retry in 2 s");
  act(() => vi.advanceTimersByTime(1000));
  expect(screen.getByTestId("error-banner")).toHaveTextContent("busy, retry in 1 s");
  act(() => vi.advanceTimersByTime(1000));
  expect(screen.getByTestId("error-banner")).toHaveTextContent("you can retry now");
});

it("shows a plain Error too", () => {
  render(<ErrorBanner error={new Error("odd")} />);
  expect(screen.getByTestId("error-banner")).toHaveTextContent("Something went wrong");
  expect(screen.getByTestId("error-banner")).toHaveTextContent("odd");
});

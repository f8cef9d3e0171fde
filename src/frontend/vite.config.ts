// Vite + Vitest config for the pipeserve UI. The dev server proxies every API path to the
// FastAPI service on :8000, so the browser only ever talks to one origin (no CORS needed).
import { defineConfig } from "vitest/config";
import react from "@vitejs/plugin-react";

const API = process.env.PIPESERVE_API_URL ?? "http://127.0.0.1:8000";
const proxied = ["/api", "/v1", "/health", "/ready", "/metrics"];

export default defineConfig({
  plugins: [react()],
  server: {
    host: "127.0.0.1",
    port: 5173,
    strictPort: true,
    proxy: Object.fromEntries(proxied.map((path) => [path, { target: API, changeOrigin: true }])),
    // Under vitest only: the tests read the repository's docs/api.md (its table of error reasons).
    ...(process.env.VITEST ? { fs: { allow: ["../.."] } } : {}),
  },
  preview: {
    host: "127.0.0.1",
    port: 4173,
    proxy: Object.fromEntries(proxied.map((path) => [path, { target: API, changeOrigin: true }])),
  },
  build: {
    outDir: "dist",
    sourcemap: false,
    target: "es2022",
  },
  test: {
    environment: "jsdom",
    globals: true,
    setupFiles: ["./src/test-setup.ts"],
    restoreMocks: true,
  },
});

# Frontend image: Vite builds the React UI (src/frontend); nginx serves it on port 5173 and proxies
# the API's routes (/api, /v1, /health, /ready, /metrics) to the API service.
# Build from the repository root: docker build -f docker/frontend.Dockerfile -t pipeserve-frontend .

# Debian (glibc), not Alpine: the lockfile's native optional packages (rollup, esbuild) are the glibc
# builds. This stage only builds; nothing of it ships but dist/.
FROM node:22.12.0-bookworm-slim AS build
WORKDIR /app
# npm ci installs exactly the lockfile (and fails when it disagrees with package.json).
COPY src/frontend/package.json src/frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY src/frontend/ ./
RUN npm run build

FROM nginx:1.27.5-alpine
# nginx runs as its unprivileged user (uid 101): port 5173, pid and temp files under /tmp. At start the
# image's entrypoint renders /etc/nginx/templates/*.template into /etc/nginx/conf.d with the
# environment: API_UPSTREAM (host:port of the API) and NGINX_LOCAL_RESOLVERS (the DNS servers of
# /etc/resolv.conf, which nginx uses to re-resolve the API's name when its container is replaced),
# and PIPESERVE_API_KEY (empty: none), which the proxy adds to what it forwards to the API.
COPY docker/nginx.conf /etc/nginx/nginx.conf
COPY docker/frontend.conf.template /etc/nginx/templates/frontend.conf.template
COPY --from=build /app/dist /usr/share/nginx/html
RUN rm -f /etc/nginx/conf.d/default.conf \
    && chown 101:101 /etc/nginx/conf.d
# PIPESERVE_API_KEY is empty here (no key): compose or the pod sets it from the shell or a Secret.
# hadolint ignore=DL3064
ENV API_UPSTREAM=api:8000 \
    NGINX_ENTRYPOINT_LOCAL_RESOLVERS=1 \
    PIPESERVE_API_KEY=""
USER 101:101
EXPOSE 5173
# Busybox wget is in the image; / is the UI itself (the proxied /health would test the API instead).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:5173/"]

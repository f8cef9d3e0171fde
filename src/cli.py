"""The `pipeserve` command: one role per process (`tokenizer`, `node`, `coordinator`, `api`,
`frontend`), `up` to run them all on this machine, and `probe` for container health checks.
Flags only pick the config file and the role; everything else lives in the config. Two tools sit
beside them: `certs` (mTLS certificates for a config) and `synth` (a synthetic model file).
"""

from __future__ import annotations

import argparse
import sys
from typing import Literal

from pipeserve.common import env
from pipeserve.common.errors import ConfigError, PipeserveError


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="config file (default: $PIPESERVE_CONFIG or src/config/config.json)",
    )
    p = argparse.ArgumentParser(prog="pipeserve", description=__doc__, parents=[common])
    sub = p.add_subparsers(dest="role", required=True)
    sub.add_parser(
        "up",
        parents=[common],
        help="start the tokenizer, every node, the coordinator, the API and the UI here",
    )
    node = sub.add_parser("node", parents=[common], help="serve one model part")
    node.add_argument("--id", required=True, help="node id (from the config, or a new one with --join)")
    node.add_argument("--join", metavar="COORDINATOR", help="register with a running coordinator (host:port)")
    node.add_argument("--part", type=int, help="model part to serve (with --join)")
    node.add_argument("--address", help="host:port to listen on and to announce (with --join)")
    node.add_argument(
        "--listen", help="host:port to listen on when peers reach the node at another address (a proxy, NAT)"
    )
    sub.add_parser("coordinator", parents=[common], help="serve the coordinator")
    sub.add_parser("tokenizer", parents=[common], help="serve the tokenizer")
    sub.add_parser("api", parents=[common], help="serve the REST API")
    sub.add_parser("frontend", parents=[common], help="serve the built UI and proxy /api and /v1 to the API")
    probe = sub.add_parser("probe", parents=[common], help="exit 0 when a service is healthy")
    probe.add_argument("kind", choices=["grpc", "http"])
    probe.add_argument("target", help="host:port (grpc) or URL (http)")
    probe.add_argument(
        "--name",
        default="",
        help="with TLS on: the service probed, whose certificate the probe uses (e.g. node1)",
    )
    certs = sub.add_parser("certs", parents=[common], help="create a CA and a certificate per service (mTLS)")
    certs.add_argument("--out", default="certs", help="folder for ca.crt, ca.key and <name>.crt/.key")
    certs.add_argument(
        "--names", default="", help="extra service names, comma-separated (nodes that will join)"
    )
    certs.add_argument("--days", type=int, default=825, help="validity of the service certificates")
    synth = sub.add_parser(
        "synth", help="write a GGUF with a published model's layout and random weights (modeling/synth.py)"
    )
    synth.add_argument("--spec", required=True, help="e.g. llama-3.1-8b, qwen2.5-7b, llama-test, qwen-test")
    synth.add_argument("--out", required=True, help="the .gguf file to write")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes")
    synth.add_argument("--layers", type=int, help="cut the model to its first N layers")
    synth.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="a placeholder vocabulary (llama.cpp's 'none') instead of a real tokenizer: needs no "
        "real GGUF to copy one from; for engine benchmarks (llama-bench, bench_engine), not serving",
    )
    args = p.parse_args(argv)
    if args.role == "probe":
        return _probe(args.kind, args.target, args.name, getattr(args, "config", None))
    if args.role == "synth":
        return _synth(args.spec, args.out, args.seed, args.layers, "none" if args.no_tokenizer else True)
    try:
        return _run(p, args)
    except ConfigError as exc:
        print(f"pipeserve: invalid config: {exc}", file=sys.stderr)
        return 2
    except PipeserveError as exc:
        print(f"pipeserve {args.role}: {exc}", file=sys.stderr)
        return 1


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pipeserve.common.config import load_config
    from pipeserve.common.logs import setup_logging

    config_path = getattr(args, "config", None)
    cfg = load_config(config_path)
    setup_logging(args.role, cfg.log_level)
    if args.role == "up":
        from pipeserve.launcher.up import run_up

        return run_up(cfg, config_path)
    if args.role == "node":
        from pipeserve.node.node_server import serve_node

        if args.join:
            if args.part is None or not args.address:
                p.error("--join needs --part and --address")
            serve_node(
                cfg, args.id, join=args.join, part=args.part, address=args.address, listen_address=args.listen
            )
        else:
            cfg.node(args.id)  # fail early with the known ids
            serve_node(cfg, args.id, listen_address=args.listen)
    elif args.role == "coordinator":
        from pipeserve.coordinator.coordinator_server import serve_coordinator

        serve_coordinator(cfg)
    elif args.role == "tokenizer":
        from pipeserve.tokenizer.tokenizer_server import serve_tokenizer

        serve_tokenizer(cfg)
    elif args.role == "api":
        from pipeserve.api.api import serve_api

        serve_api(cfg)
    elif args.role == "frontend":
        from pipeserve.launcher.frontend import serve_frontend

        serve_frontend(cfg)
    elif args.role == "certs":
        from pathlib import Path

        from pipeserve.common.certs import make_cluster_certs

        extra = [n for n in args.names.split(",") if n]
        written = make_cluster_certs(cfg, Path(args.out), extra, args.days)
        print(
            f"wrote {Path(args.out) / 'ca.crt'} and {len(written)} certificates: {', '.join(p.stem for p in written)}"
        )
        print(f"keep {Path(args.out) / 'ca.key'} private: whoever has it can admit nodes")
    return 0


def _synth(
    spec: str, out: str, seed: int, layers: int | None, tokenizer: bool | Literal["none"] = True
) -> int:
    import time
    from pathlib import Path

    from pipeserve.modeling import synth

    if spec not in synth.SPECS:
        print(f"pipeserve synth: unknown spec {spec!r} (have {', '.join(synth.SPECS)})", file=sys.stderr)
        return 2

    def progress(done: int, total: int) -> None:
        print(f"\r{done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        path = synth.write(spec, Path(out).expanduser(), seed, layers, tokenizer=tokenizer, progress=progress)
    except (ValueError, PipeserveError) as exc:
        print(f"\npipeserve synth: {exc}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    size = path.stat().st_size
    print(f"{path}  {size:,} bytes ({size / 2**30:.2f} GiB)  {time.perf_counter() - t0:.1f} s")
    return 0


def _probe(kind: str, target: str, name: str = "", config: str | None = None) -> int:
    if kind == "grpc":
        from pipeserve.common.config import load_config
        from pipeserve.common.grpc_util import probe

        cfg = load_config(config) if config or env.get("PIPESERVE_CONFIG") else None
        if cfg is not None and cfg.tls.enabled and not name:
            print(
                "pipeserve probe: TLS is enabled: --name must say which service's certificate to use",
                file=sys.stderr,
            )
            return 2
        return 0 if probe(target, cfg=cfg, name=name) else 1
    import urllib.request

    try:
        with urllib.request.urlopen(target, timeout=3) as resp:
            return 0 if resp.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())

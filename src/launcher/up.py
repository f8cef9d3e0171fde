"""`pipeserve up`: every service of the config on this machine, as separate processes.

Starts the tokenizer, each node, the coordinator, the API and the UI server on the config's
ports (hosts mapped to 127.0.0.1), prints progress until each is healthy, then the URLs. A child
that dies is reported, not fatal to the others. Ctrl-C (or SIGTERM) stops them all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeserve.common import env
from pipeserve.common.config import Config
from pipeserve.common.grpc_util import probe

LOG_DIR = Path(env.get("PIPESERVE_LOG_DIR", ".pipeserve/logs") or ".pipeserve/logs")


@dataclass
class Child:
    name: str
    args: list[str]
    health: tuple[str, str]  # ("grpc", host:port) or ("http", url)
    proc: subprocess.Popen | None = None
    log: IO[bytes] | None = None
    healthy: bool = False
    cfg: Config | None = None  # for TLS: a gRPC child is probed under its own name

    def check(self) -> bool:
        kind, target = self.health
        if kind == "grpc":
            return probe(target, timeout_s=0.5, cfg=self.cfg, name=self.name)
        try:
            with urllib.request.urlopen(target, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def _children(cfg: Config, config_file: str) -> list[Child]:
    base = [sys.executable, "-m", "pipeserve.cli"]
    kids = [
        Child(
            "tokenizer",
            [*base, "tokenizer", "--config", config_file],
            ("grpc", cfg.tokenizer.address),
            cfg=cfg,
        )
    ]
    kids += [
        Child(n.id, [*base, "node", "--id", n.id, "--config", config_file], ("grpc", n.address), cfg=cfg)
        for n in cfg.nodes
    ]
    kids.append(
        Child(
            "coordinator",
            [*base, "coordinator", "--config", config_file],
            ("grpc", cfg.coordinator.address),
            cfg=cfg,
        )
    )
    kids.append(
        Child(
            "api",
            [*base, "api", "--config", config_file],
            ("http", f"http://127.0.0.1:{cfg.api.port}/health"),
        )
    )
    kids.append(
        Child(
            "frontend",
            [*base, "frontend", "--config", config_file],
            ("http", f"http://127.0.0.1:{cfg.frontend.port}/"),
        )
    )
    return kids


def run_up(cfg: Config, config_path: str | None = None, ready_timeout_s: float = 600) -> int:
    local = cfg.with_loopback_hosts()
    fd, config_file = tempfile.mkstemp(prefix="pipeserve-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(local.model_dump(mode="json"), f)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    kids = _children(local, config_file)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()
    print(
        f"pipeserve up: {local.model_name}, {len(local.nodes)} nodes in {local.n_parts} parts; logs in {LOG_DIR}/",
        flush=True,
    )
    try:
        for k in kids:
            k.log = open(LOG_DIR / f"{k.name}.log", "wb")  # noqa: SIM115 - closed in _stop_all
            k.proc = subprocess.Popen(k.args, stdout=k.log, stderr=subprocess.STDOUT, start_new_session=True)
        last_print = 0.0
        while not stopping and not all(k.healthy for k in kids):
            for k in kids:
                if k.proc and k.proc.poll() is not None:
                    print(
                        f"  {k.name} exited with code {k.proc.returncode} during start-up:\n{_tail(k.name)}",
                        flush=True,
                    )
                    return 1
                if not k.healthy:
                    k.healthy = k.check()
            now = time.monotonic()
            if now - t0 > ready_timeout_s:
                print(f"  gave up after {ready_timeout_s:.0f} s", flush=True)
                return 1
            if now - last_print >= 2:
                waiting = [k.name for k in kids if not k.healthy]
                if waiting:
                    print(f"  [{now - t0:5.1f} s] loading: {', '.join(waiting)}", flush=True)
                last_print = now
            time.sleep(0.25)
        if stopping:
            return 0
        print(f"pipeserve is up in {time.monotonic() - t0:.1f} s", flush=True)
        print(f"  UI:           http://localhost:{local.frontend.port}", flush=True)
        print(
            f"  API:          http://localhost:{local.api.port}  (OpenAI base URL: http://localhost:{local.api.port}/v1)",
            flush=True,
        )
        print(
            f"  coordinator:  {local.coordinator.address}   tokenizer: {local.tokenizer.address}", flush=True
        )
        for n in local.nodes:
            print(f"  {n.id}: {n.address} (part {n.model_part})", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        reported: set[str] = set()
        while not stopping:
            for k in kids:
                if k.proc and k.proc.poll() is not None and k.name not in reported:
                    reported.add(k.name)
                    print(
                        f"  {k.name} exited with code {k.proc.returncode}; the others keep running. "
                        f"Log: {LOG_DIR / (k.name + '.log')}",
                        flush=True,
                    )
            time.sleep(0.5)
        return 0
    finally:
        _stop_all(kids)
        os.unlink(config_file)
        print("pipeserve: stopped", flush=True)


def _stop_all(kids: list[Child], grace_s: float = 5.0) -> None:
    for k in kids:
        if k.proc and k.proc.poll() is None:
            k.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for k in kids:
        if k.proc:
            try:
                k.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                k.proc.kill()
                k.proc.wait()
        if k.log:
            k.log.close()


def _tail(name: str, lines: int = 15) -> str:
    path = LOG_DIR / f"{name}.log"
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
    return "\n".join("    " + t for t in text)

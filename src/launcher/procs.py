"""Starts a cluster as real processes (`python -m pipeserve.cli <role>`), so tests and benchmarks can SIGKILL a
node by PID, restart it at its address, and measure each process's memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from pipeserve.common.config import Config
from pipeserve.common.grpc_util import probe


class ProcessCluster:
    def __init__(
        self,
        cfg: Config,
        workdir: Path,
        with_api: bool = False,
        node_module: str = "pipeserve.cli",
        node_prefix: Callable[[str], list[str]] | None = None,
    ) -> None:
        """`node_module`: what nodes run as (`python -m <it> node ...`); tests pass a wrapper of
        the CLI (tests/paced_node.py) whose steps take a fixed minimum time. `node_prefix(node_id)`:
        a command that runs a node's command line (as `taskset` or `systemd-run` would; the memory
        budget tests put each node into a cgroup of its own this way)."""
        self.cfg = cfg
        self.node_module = node_module
        self.node_prefix = node_prefix
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "config.json"
        self.config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
        self.procs: dict[str, subprocess.Popen] = {}
        self.with_api = with_api

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child process
        env = {**os.environ, "PIPESERVE_LOG_LEVEL": "INFO"}
        node = args[:1] == ("node",)
        module = self.node_module if node else "pipeserve.cli"
        prefix = self.node_prefix(name) if node and self.node_prefix else []
        p = subprocess.Popen(
            [*prefix, sys.executable, "-m", module, *args, "--config", str(self.config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.procs[name] = p
        return p

    def start(self, timeout_s: float = 180, wait: bool = True) -> ProcessCluster:
        """Start every process; `wait`: until the coordinator is ready (a cluster that must refuse
        to load never gets there)."""
        self._spawn("tokenizer", "tokenizer")
        for n in self.cfg.nodes:
            self._spawn(n.id, "node", "--id", n.id)
        self._spawn("coordinator", "coordinator")
        if self.with_api:
            self._spawn("api", "api")
        if wait:
            self.wait_ready(timeout_s)
        return self

    def start_node(self, node_id: str, timeout_s: float = 120) -> float:
        """(Re)start a node from the config; returns seconds until it serves."""
        t0 = time.monotonic()
        self._spawn(node_id, "node", "--id", node_id)
        addr = self.cfg.node(node_id).address
        self._wait(
            lambda: probe(addr, 0.5, cfg=self.cfg, name=node_id),
            timeout_s,
            lambda: f"{node_id} did not come up: {self.log(node_id)}",
        )
        return time.monotonic() - t0

    def wait_ready(self, timeout_s: float = 180) -> None:
        self._wait(
            lambda: probe(self.cfg.coordinator.address, 0.5, cfg=self.cfg, name="coordinator"),
            timeout_s,
            lambda: "cluster not ready; coordinator log:\n" + self.log("coordinator"),
        )

    def _wait(self, cond: Callable[[], bool], timeout_s: float, message: str | Callable[[], str]) -> None:
        """Until cond(); past the timeout, RuntimeError with the message (a callable is read then,
        so a log it quotes is the log at the time of the failure)."""
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(message() if callable(message) else message)
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        os.kill(p.pid, signal.SIGKILL)
        p.wait()

    def rss_mib(self, name: str) -> float:
        return psutil.Process(self.procs[name].pid).memory_info().rss / 2**20

    def log(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False

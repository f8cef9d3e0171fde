"""`pipeserve up` with the default config: every service comes up healthy on the spec's ports,
a request through the REST API generates, and Ctrl-C (SIGINT) leaves no process behind. Also
the memory split: each node of a 3-part cluster holds roughly its share of a 1-node cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from pipeserve.common.config import DEFAULT_CONFIG, load_config
from pipeserve.launcher.procs import ProcessCluster
from tests.harness import cluster_config

pytestmark = pytest.mark.slow


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_up_with_default_config_then_ctrl_c(tmp_path):
    cfg = load_config(DEFAULT_CONFIG)
    ports = [
        int(a.rsplit(":", 1)[1])
        for a in [cfg.coordinator.address, cfg.tokenizer.address, *(n.address for n in cfg.nodes)]
    ]
    ports += [cfg.api.port, cfg.frontend.port]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        pytest.skip(f"ports {busy} are in use (is `make up` running?)")
    env = {**os.environ, "PIPESERVE_LOG_DIR": str(tmp_path / "logs")}
    t0 = time.monotonic()
    up = subprocess.Popen(
        [sys.executable, "-m", "pipeserve.cli", "up"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    lines = []
    try:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if line.startswith("pipeserve is up") or "exited" in line:
                break
        assert any(line.startswith("pipeserve is up") for line in lines), "".join(lines)
        healthy_s = time.monotonic() - t0
        body = json.dumps(
            {
                "text": "What is the capital of France?",
                "metadata": {"timestamp": "2024-02-17T12:00:00Z", "type": "chat"},
                "temperature": 0,
            }
        )
        req = urllib.request.Request(
            f"http://127.0.0.1:{cfg.api.port}/api/model/process",
            body.encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert "Paris" in out["text"] and out["nodeCount"] == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.frontend.port}/", timeout=10) as resp:
            assert resp.status == 200
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 7  # tokenizer, 3 nodes, coordinator, api, frontend
        print(f"time to healthy: {healthy_s:.1f} s")
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(30)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {alive}"
    assert up.returncode == 0


def test_each_node_holds_only_its_share(tmp_path):
    three = ProcessCluster(cluster_config("smollm2-135m-instruct", 3), tmp_path / "three")
    one = ProcessCluster(cluster_config("smollm2-135m-instruct", 1), tmp_path / "one")
    try:
        three.start()
        one.start()
        full = one.rss_mib("node1")
        parts = {n: three.rss_mib(n) for n in ("node1", "node2", "node3")}
        print(f"RSS MiB: one-node {full:.0f}; three-node {parts}")
        # ~225 MiB of each process is the Python + torch + gRPC runtime; the rest is weights and caches
        assert all(v < 0.7 * full for v in parts.values()), (full, parts)
        assert parts["node2"] < 0.55 * full, (full, parts)
        assert parts["node2"] < parts["node1"] and parts["node2"] < parts["node3"]  # no embedding, no head
    finally:
        three.stop()
        one.stop()

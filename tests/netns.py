"""Simulated hosts for tests and benchmarks: Linux network namespaces joined by veth pairs to a
bridge, with a TCP delay proxy in front of each node (this kernel has no netem) and `tc tbf` for
bandwidth.

Addresses come from 10.213.0.0/24, a private range, and exist only inside the namespaces; before
anything is created the root namespace gets an `unreachable` route for that range, so no packet
for it can leave the machine. Every name is prefixed `ps-` and removed again by `Hosts.close()`.

    python -m tests.netns proxy LISTEN UPSTREAM DELAY_MS   # the delay proxy (run inside a host)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"
ROUTE = f"{SUBNET}.0/24"


def _ip(*args: str, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = subprocess.run(["ip", "netns", "add", "ps-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "ps-probe"], capture_output=True)
    return None


@dataclass
class Hosts:
    """Hosts `names` (a namespace each) on one bridge; host i has address 10.213.0.(i+10)."""

    names: list[str]
    rate: str | None = None  # tc tbf rate on every host's link, e.g. "1gbit"
    addr: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        routes = subprocess.run(["ip", "route", "show", ROUTE], capture_output=True, text=True).stdout
        if "unreachable" not in routes:  # first: nothing for the test range leaves the machine
            subprocess.run(["ip", "route", "add", "unreachable", ROUTE], check=True, capture_output=True)
        self.close_namespaces()
        subprocess.run(["ip", "netns", "add", "ps-sw"], check=True, capture_output=True)
        _ip("link", "add", "br0", "type", "bridge", ns="ps-sw")
        _ip("link", "set", "br0", "up", ns="ps-sw")
        for i, name in enumerate(self.names):
            ns, a = f"ps-{name}", f"{SUBNET}.{i + 10}"
            self.addr[name] = a
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            subprocess.run(
                ["ip", "link", "add", f"ps{i}", "type", "veth", "peer", "name", f"ps{i}b"],
                check=True,
                capture_output=True,
            )
            subprocess.run(["ip", "link", "set", f"ps{i}", "netns", ns], check=True, capture_output=True)
            subprocess.run(
                ["ip", "link", "set", f"ps{i}b", "netns", "ps-sw"], check=True, capture_output=True
            )
            _ip("link", "set", f"ps{i}b", "master", "br0", ns="ps-sw")
            _ip("link", "set", f"ps{i}b", "up", ns="ps-sw")
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{a}/24", "dev", f"ps{i}", ns=ns)
            _ip("link", "set", f"ps{i}", "up", ns=ns)
            if self.rate:
                subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        f"ps{i}",
                        "root",
                        "tbf",
                        "rate",
                        self.rate,
                        "burst",
                        "256kb",
                        "latency",
                        "50ms",
                    ],
                    check=True,
                    capture_output=True,
                )

    def spawn(self, host: str, args: list[str], log: Path) -> subprocess.Popen:
        out = open(log, "ab")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(
            ["ip", "netns", "exec", f"ps-{host}", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def run(self, host: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", f"ps-{host}", *args], capture_output=True, text=True, timeout=timeout
        )

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        self.close_namespaces()

    def close_namespaces(self) -> None:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for ns in [n for n in listed if n.startswith("ps-")]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ---- a pipeserve cluster on the hosts ----------------------------------------------------------
HOSTS = ["front", "n1", "n2", "n3"]  # tokenizer + coordinator on front, one node per n*


def cluster_raw(hosts: Hosts, threads: int = 1) -> dict:
    """The config of a 3-node cluster of the embedded model on `hosts` (addresses in the test range)."""
    front = hosts.addr["front"]
    return {
        "model_name": "smollm2-135m-instruct",
        "nodes": [
            {
                "id": f"node{i}",
                "address": f"{hosts.addr[f'n{i}']}:{50050 + i}",
                "model_part": i - 1,
                "threads": threads,
            }
            for i in (1, 2, 3)
        ],
        "coordinator": {"address": f"{front}:50050", "health_interval_s": 0.5},
        "tokenizer": {"address": f"{front}:50054"},
    }


def start_cluster(hosts: Hosts, raw: dict, workdir: Path, delay_ms: float = 0.0, proxy: bool = False) -> Path:
    """Start tokenizer and coordinator on front and node i on n<i>. With `delay_ms`, each node
    listens on 127.0.0.1 of its host behind a proxy on its address that delays every byte by
    delay_ms each way: every link to a node (coordinator -> node1, node -> node, and the results
    coming back) gets that one-way latency. `proxy` puts the proxies in place at 0 ms too (the
    baseline for the effect of the delay alone: the proxies cost CPU)."""
    import json

    workdir.mkdir(parents=True, exist_ok=True)
    cfg_file = workdir / "config.json"
    cfg_file.write_text(json.dumps(raw))
    py = [sys.executable, "-m", "pipeserve.cli"]
    hosts.spawn("front", [*py, "tokenizer", "--config", str(cfg_file)], workdir / "tokenizer.log")
    for i, n in enumerate(raw["nodes"], start=1):
        port = n["address"].rsplit(":", 1)[1]
        args = [*py, "node", "--id", n["id"], "--config", str(cfg_file)]
        inner = f"127.0.0.1:{int(port) - 30000}"  # below the ephemeral range: a proxy's connect can't take it
        proxied = delay_ms > 0 or proxy
        if proxied:
            args += ["--listen", inner]
        hosts.spawn(f"n{i}", args, workdir / f"{n['id']}.log")  # the node binds before its proxy forwards
        if proxied:
            hosts.spawn(
                f"n{i}",
                [sys.executable, "-m", "tests.netns", "proxy", n["address"], inner, str(delay_ms)],
                workdir / f"proxy{i}.log",
            )
    hosts.spawn("front", [*py, "coordinator", "--config", str(cfg_file)], workdir / "coordinator.log")
    return cfg_file


CLIENT = r"""
import asyncio, json, sys, time
import grpc
from pipeserve.common.grpc_util import probe
from pipeserve.proto import model_service_pb2 as pb, model_service_pb2_grpc as pb_grpc

address, n_tokens, streams, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
prompts = json.loads(sys.argv[5])
deadline = time.monotonic() + timeout
while not probe(address, 1.0):
    if time.monotonic() > deadline:
        sys.exit("the coordinator did not become ready")
    time.sleep(0.5)

async def one(stub, ids):
    req = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=n_tokens,
                             sampling=pb.SamplingParams(temperature=0), ignore_eos=True)
    toks, first = [], None
    async for m in stub.Generate(req, timeout=600):
        if m.token_ids and first is None:
            first = time.perf_counter()
        toks += list(m.token_ids)
    return toks, first, time.perf_counter()

async def main():
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        await one(stub, prompts[0][:4])  # warm-up
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(stub, prompts[i % len(prompts)]) for i in range(streams)))
        t1 = time.perf_counter()
    decode = [(len(t) - 1) / (end - first) for t, first, end in outs if first and len(t) > 1]
    print(json.dumps({"tokens": [o[0] for o in outs], "wall_s": t1 - t0,
                      "aggregate_tok_s": sum(len(o[0]) for o in outs) / (t1 - t0),
                      "per_stream_decode_tok_s": sum(decode) / len(decode)}))

asyncio.run(main())
"""


def run_client(
    hosts: Hosts, address: str, prompts: list[list[int]], n_tokens: int, streams: int, timeout: float = 240
) -> dict:
    """Generate from inside the front host (the test range is unreachable from the root namespace)."""
    import json

    run = hosts.run(
        "front",
        [
            sys.executable,
            "-c",
            CLIENT,
            address,
            str(n_tokens),
            str(streams),
            str(timeout),
            json.dumps(prompts),
        ],
        timeout=timeout + 600,
    )
    if run.returncode != 0:
        raise RuntimeError(f"client failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---- the delay proxy --------------------------------------------------------------------------
async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy bytes, each chunk delivered `delay_s` after it arrived (order kept)."""
    q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await q.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            q.put_nowait((time.monotonic() + delay_s, data))
    except ConnectionError:
        pass
    q.put_nowait((0.0, b""))
    try:
        await task
    except ConnectionError:
        pass


async def proxy(listen: str, upstream: str, delay_ms: float) -> None:
    lhost, lport = listen.rsplit(":", 1)
    uhost, uport = upstream.rsplit(":", 1)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(uhost, int(uport))
        except OSError:
            w.close()
            return
        await asyncio.gather(_pump(r, uw, delay_ms / 1e3), _pump(ur, w, delay_ms / 1e3))

    server = await asyncio.start_server(handle, lhost, int(lport))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "proxy":
        asyncio.run(proxy(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    else:
        sys.exit(__doc__)

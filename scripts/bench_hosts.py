"""Simulated hosts (`make bench-hosts`): the embedded model on 3 nodes in separate network
namespaces (tests/netns.py: a bridge, 1 Gbit/s tc tbf per link, a TCP delay proxy in front of each
node adding D ms one way to every link), D = 0, 1 and 5 ms, on the chain (the data path; the hub path it
replaced was removed, its last figures are history in docs/benchmarks.md); and 1 node (D = 0) as the single-machine reference. Each row: greedy streams of 32 tokens driven
through the coordinator's gRPC API from the front host; per-stream decode tok/s at 1 stream, and
aggregate tok/s (all tokens / wall time) at 16 streams. 1 kernel thread per node (the machine has
2 cores for 3 nodes). Needs root (namespaces). Writes bench/hosts.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.netns import Hosts, cluster_raw, run_client, start_cluster, unavailable_reason

PROMPTS = [
    [1, 2364, 314, 253, 6134, 288, 2],
    [1, 504, 3458, 282, 4052, 314],
    [1, 17, 18, 19, 20, 21, 22, 23],
    [1, 9, 1036, 436, 253, 1345],
]


def measure(delay_ms: float, n_nodes: int, tokens: int, work: Path, proxy: bool = True) -> dict[str, Any]:
    names = ["front", *(f"n{i}" for i in range(1, n_nodes + 1))]
    hosts = Hosts(names, rate="1gbit")
    try:
        raw = cluster_raw(hosts, threads=1) if n_nodes == 3 else _one_node(hosts)
        start_cluster(hosts, raw, work, delay_ms, proxy)
        address = raw["coordinator"]["address"]
        one = run_client(hosts, address, PROMPTS[:1], tokens, 1)
        many = run_client(hosts, address, PROMPTS, tokens, 16)
        return {
            "data_path": "chain",
            "nodes": n_nodes,
            "delay_ms_per_link": delay_ms,
            "delay_proxy": proxy,
            "rate": "1gbit",
            "single_stream_tok_s": one["per_stream_decode_tok_s"],
            "aggregate_tok_s_16": many["aggregate_tok_s"],
        }
    finally:
        hosts.close()


def _one_node(hosts: Hosts) -> dict[str, Any]:
    front = hosts.addr["front"]
    return {
        "model_name": "smollm2-135m-instruct",
        "nodes": [{"id": "node1", "address": f"{hosts.addr['n1']}:50051", "model_part": 0, "threads": 1}],
        "coordinator": {"address": f"{front}:50050", "health_interval_s": 0.5},
        "tokenizer": {"address": f"{front}:50054"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/hosts.json"))
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        sys.exit(f"bench-hosts: {reason}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(measure(0.0, 1, args.tokens, Path(tmp) / "one", proxy=False))
        rows.append(measure(0.0, 3, args.tokens, Path(tmp) / "direct", proxy=False))
        print(json.dumps(rows[-1]), flush=True)
        for delay in (0.0, 1.0, 5.0):
            rows.append(measure(delay, 3, args.tokens, Path(tmp) / f"delay{delay}"))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "command": "make bench-hosts"}, indent=1))
    print("| nodes | data path | links | 1 stream tok/s | 16 streams aggregate tok/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        link = f"proxy +{r['delay_ms_per_link']:g} ms" if r["delay_proxy"] else "direct"
        print(
            f"| {r['nodes']} | {r['data_path']} | {link} | "
            f"{r['single_stream_tok_s']:.1f} | {r['aggregate_tok_s_16']:.1f} |"
        )


if __name__ == "__main__":
    main()

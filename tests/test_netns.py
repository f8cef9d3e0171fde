"""A cluster across Linux network namespaces: one host (namespace) for the tokenizer and the
coordinator and one per node, on a bridge, links limited to 1 Gbit/s (tc tbf) and 2 ms one-way
delay in front of every node (a TCP delay proxy: this kernel has no netem). The chain data path's
node-to-node links cross real interfaces; generation equals the single-process engine token for
token. The addresses (10.213.0.0/24) exist only inside the namespaces, and the root namespace has
an `unreachable` route for them, added before anything else."""

from __future__ import annotations

import subprocess

import pytest

from pipeserve.modeling.engine import StageEngine
from pipeserve.modeling.generate import generate
from tests.netns import HOSTS, ROUTE, Hosts, cluster_raw, run_client, start_cluster, unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PROMPTS = [[1, 2364, 314, 253, 6134, 288, 2], [1, 504, 3458, 282, 4052, 314], [1, 17, 18, 19, 20, 21, 22, 23]]


def test_a_cluster_across_namespaces_equals_the_engine(tmp_path, smol_full) -> None:
    hosts = Hosts(HOSTS, rate="1gbit")
    try:
        assert (
            "unreachable"
            in subprocess.run(["ip", "route", "show", ROUTE], capture_output=True, text=True).stdout
        )
        raw = cluster_raw(hosts)
        start_cluster(hosts, raw, tmp_path, delay_ms=2.0)
        out = run_client(hosts, raw["coordinator"]["address"], PROMPTS, 12, streams=len(PROMPTS))
        engine = StageEngine(smol_full)
        assert out["tokens"] == [generate([engine], [p], 12)[0] for p in PROMPTS]
    except Exception:
        for log in sorted(tmp_path.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}")
        raise
    finally:
        hosts.close()

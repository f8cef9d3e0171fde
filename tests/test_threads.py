"""`threads: auto` and `micro_batches: 0`: the choices of src/common/threads.py from cores, hosts and
settings, the cgroup quota readers over fake /sys trees, the config's refusals, and the
coordinator's view (Cluster over fake nodes reporting host ids) that feeds both back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeserve.common import threads as t
from pipeserve.common.config import parse_config
from pipeserve.common.errors import ConfigError
from pipeserve.coordinator.cluster import Cluster
from pipeserve.proto import model_service_pb2 as pb
from tests.fake_stages import FakeStage, FakeTokenizer, fake_cluster_config


# ---- the node's threads -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cores", "sharing", "want"),
    [(2, 1, 2), (16, 1, 16), (16, 3, 5), (2, 3, 1), (1, 8, 1), (0, 0, 1), (1000, 1, t.MAX_THREADS)],
)
def test_auto_divides_the_cores_never_below_one(cores: int, sharing: int, want: int) -> None:
    n, why = t.choose_threads(cores, sharing, "auto")
    assert n == want and why.startswith("auto:")


def test_an_explicit_number_overrides_auto() -> None:
    assert t.choose_threads(16, 3, 4) == (4, "set to 4 in the config")
    assert t.choose_threads(1, 3, 8)[0] == 8  # explicit: as given, even beyond the cores


def test_the_reason_shows_the_arithmetic() -> None:
    _, why = t.choose_threads(16, 3, "auto", "affinity", "3 nodes on this host")
    assert why == "auto: 16 cores (affinity) / 3 nodes computing at once (3 nodes on this host)"


def test_sharing_one_group_lets_stages_take_turns() -> None:
    assert t.sharing(1, [0]) == (1, "the only node of the cluster on this host")
    assert t.sharing(1, [0, 1, 2])[0] == 1  # one group: the three stages never compute together
    assert t.sharing(1, [0, 1, 1, 2])[0] == 2  # but two replicas of part 1 do
    assert t.sharing(3, [0, 1, 2])[0] == 3  # three groups in flight: all three at once
    assert t.sharing(2, [0, 1, 2])[0] == 2  # two groups: at most two steps at once


def _config_nodes(*addresses: str) -> list[tuple[str, str, int]]:
    return [(f"node{i + 1}", a, i) for i, a in enumerate(addresses)]


def test_one_host_with_one_and_three_nodes() -> None:
    """From the config: loopback addresses are one host; one group (auto) on one host lets each
    node use every core, and an explicit micro_batches makes them divide."""
    one = _config_nodes("127.0.0.1:1")
    assert t.config_sharing(one, 0, "node1", "127.0.0.1:1", 0)[0] == 1
    three = _config_nodes("127.0.0.2:1", "localhost:2", "127.0.0.1:3")
    n, why = t.config_sharing(three, 0, "node2", "localhost:2", 1)
    assert n == 1 and "take turns" in why and "config's addresses" in why
    assert t.choose_threads(2, n, "auto")[0] == 2
    n, _ = t.config_sharing(three, 3, "node2", "localhost:2", 1)  # micro_batches: 3
    assert n == 3 and t.choose_threads(16, n, "auto")[0] == 5


def test_several_hosts() -> None:
    nodes = _config_nodes("10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.2:50052")
    # auto: one group per part across hosts; node1 is alone, nodes 2 and 3 share 10.0.0.2
    assert t.config_sharing(nodes, 0, "node1", "10.0.0.1:50051", 0)[0] == 1
    assert t.config_sharing(nodes, 0, "node2", "10.0.0.2:50051", 1)[0] == 2
    assert t.choose_threads(16, 2, "auto")[0] == 8
    # a joined node (not in the config) on 10.0.0.1 counts itself and node1
    assert t.config_sharing(nodes, 0, "node9", "10.0.0.1:50099", 2)[0] == 2


def test_micro_batches_shared_vs_separate_hosts() -> None:
    n, why = t.choose_micro_batches(0, 3, ["h", "h", "h"], "by the host ids the nodes report")
    assert n == 1 and "one host" in why
    n, why = t.choose_micro_batches(0, 3, ["a", "b", "c"], "by the config's addresses")
    assert n == 3 and "3 hosts" in why
    assert t.choose_micro_batches(0, 3, ["a", "a", "b"], "")[0] == 3
    assert t.choose_micro_batches(2, 3, ["h", "h", "h"], "") == (2, "set to 2 in the config")
    assert t.choose_micro_batches(0, 1, ["a", "b"], "")[0] == 1  # one part: nothing to overlap


def test_address_host_joins_loopback() -> None:
    assert {t.address_host(a) for a in ("127.0.0.1:1", "127.0.0.9:2", "LOCALHOST:3")} == {t.LOOPBACK}
    assert t.address_host("node1:50051") == "node1"


# ---- cores: affinity and cgroup quotas ----------------------------------------------------------
def test_cgroup_v2_quota_caps_the_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert t.cgroup_quota(tmp_path, "0::/\n") == 2.5
    assert t.usable_cores(16, tmp_path, "0::/\n") == (2, "cgroup quota 2.5 of 16 in affinity")
    assert t.usable_cores(2, tmp_path, "0::/\n") == (2, "affinity")  # the quota is above it
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert t.cgroup_quota(tmp_path, "0::/\n") is None
    assert t.usable_cores(16, tmp_path, "0::/\n") == (16, "affinity")


def test_cgroup_v2_quota_of_an_ancestor(tmp_path: Path) -> None:
    """On a host without a cgroup namespace the process's cgroup is a path under the root; the
    smallest quota on it or an ancestor applies."""
    leaf = tmp_path / "system.slice" / "pipeserve.service"
    leaf.mkdir(parents=True)
    (leaf / "cpu.max").write_text("max 100000\n")
    (leaf.parent / "cpu.max").write_text("150000 100000\n")
    assert t.cgroup_quota(tmp_path, "0::/system.slice/pipeserve.service\n") == 1.5
    assert t.usable_cores(8, tmp_path, "0::/system.slice/pipeserve.service\n")[0] == 1


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    assert t.cgroup_quota(tmp_path, proc) == 3.0
    assert t.usable_cores(64, tmp_path, proc)[0] == 3
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert t.cgroup_quota(tmp_path, proc) is None


def test_a_quota_below_one_core_still_gives_one(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    cores, _ = t.usable_cores(4, tmp_path, "0::/\n")
    assert cores == 1 and t.choose_threads(cores, 3, "auto")[0] == 1


def test_this_process_has_cores() -> None:
    cores, why = t.usable_cores()
    assert cores >= 1 and why


def test_pool_id_is_the_kernel_unless_confined(tmp_path: Path) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("1b4e28ba-2fa1-11d2-883f-0016d3cca427\n")
    free_a = t.pool_id(boot, confined=False, hostname="container-a")
    assert free_a == t.pool_id(boot, confined=False, hostname="container-b")  # Docker without limits
    limited_a = t.pool_id(boot, confined=True, hostname="pod-a")
    assert limited_a != t.pool_id(boot, confined=True, hostname="pod-b")  # a CPU budget of its own
    assert limited_a == t.pool_id(boot, confined=True, hostname="pod-a")  # nodes in one pod share it
    other = tmp_path / "other"
    other.write_text("another-boot\n")
    assert t.pool_id(other, confined=False, hostname="x") != free_a  # another machine
    assert len(free_a) == 12 and t.pool_id()


# ---- the config ---------------------------------------------------------------------------------
BASE = {"nodes": [{"id": "node1", "address": "127.0.0.1:50051", "model_part": 0}]}


def test_config_threads_default_auto_and_accepts_numbers() -> None:
    assert parse_config(BASE).node_defaults.threads == "auto"
    assert parse_config({**BASE, "node_defaults": {"threads": 4}}).node_defaults.threads == 4
    nodes = [{**BASE["nodes"][0], "threads": "auto"}]
    assert parse_config({"nodes": nodes}).nodes[0].threads == "auto"
    assert parse_config({"nodes": [{**BASE["nodes"][0], "threads": 2}]}).nodes[0].threads == 2
    assert parse_config(BASE).nodes[0].threads is None  # node_defaults decides


@pytest.mark.parametrize("bad", [0, -1, "fast", 2.5, True, 257])
def test_config_threads_refusals_name_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"node_defaults\.threads: must be 'auto' or a whole number"):
        parse_config({**BASE, "node_defaults": {"threads": bad}})
    with pytest.raises(ConfigError, match=r"nodes\[0\]\.threads \(node 'node1'\): must be 'auto'"):
        parse_config({"nodes": [{**BASE["nodes"][0], "threads": bad}]})


def test_shipped_config_leaves_threads_to_auto() -> None:
    import json

    from pipeserve.common.config import DEFAULT_CONFIG

    raw = json.loads(DEFAULT_CONFIG.read_text())
    assert "threads" not in raw.get("node_defaults", {}) and all("threads" not in n for n in raw["nodes"])


# ---- the coordinator's view ---------------------------------------------------------------------
class HostedStage(FakeStage):
    """A fake node that reports a host id and records the host_sharing the coordinator sends."""

    def __init__(self, node_id: str, part: int, parts: int, host_id: str) -> None:
        super().__init__(node_id, part, parts)
        self.host_id = host_id
        self.sharing_seen: list[int] = []

    async def info(self, host_sharing: int = 0) -> pb.NodeInfo:
        self.sharing_seen.append(host_sharing)
        info = await super().info()
        info.host_id = self.host_id
        return info


def _cluster(hosts: list[str], **coordinator: object) -> tuple[Cluster, dict[str, HostedStage]]:
    cfg = fake_cluster_config(len(hosts), **coordinator)
    stages = {n.id: HostedStage(n.id, n.model_part, len(hosts), hosts[n.model_part]) for n in cfg.nodes}
    by_address = {n.address: stages[n.id] for n in cfg.nodes}
    return Cluster(cfg, node_client=by_address.__getitem__, tokenizer=FakeTokenizer()), stages  # type: ignore[arg-type]


def test_coordinator_one_group_when_the_nodes_report_one_host() -> None:
    """The fake config's addresses are three hosts (one group per part), but the nodes report one
    host id (Docker service names on one machine): one group, and each node hears that it computes
    alone on its cores."""

    async def run() -> None:
        cluster, stages = _cluster(["h", "h", "h"])
        assert cluster.micro_batches == 3 and "config's addresses" in cluster.micro_batches_reason
        await cluster.refresh()
        assert cluster.micro_batches == 1 and "host ids" in cluster.micro_batches_reason
        assert cluster.host_sharing == {"node1": 1, "node2": 1, "node3": 1}
        await cluster.refresh()
        assert all(s.sharing_seen == [0, 1] for s in stages.values())  # unknown first, then the count
        await cluster.close()

    asyncio.run(run())


def test_coordinator_one_group_per_part_across_hosts() -> None:
    async def run() -> None:
        cluster, _ = _cluster(["a", "b", "b"])
        await cluster.refresh()
        assert cluster.micro_batches == 3 and "2 hosts" in cluster.micro_batches_reason
        # node2 and node3 share host b and three groups are in flight: both compute at once
        assert cluster.host_sharing == {"node1": 1, "node2": 2, "node3": 2}
        await cluster.close()

    asyncio.run(run())


def test_coordinator_explicit_micro_batches_wins() -> None:
    async def run() -> None:
        cluster, _ = _cluster(["h", "h", "h"], micro_batches=2)
        await cluster.refresh()
        assert (cluster.micro_batches, cluster.micro_batches_reason) == (2, "set to 2 in the config")
        assert cluster.host_sharing == {"node1": 2, "node2": 2, "node3": 2}
        await cluster.close()

    asyncio.run(run())


# ---- the node's pool ----------------------------------------------------------------------------
def test_the_node_adopts_the_coordinators_count_only_with_auto() -> None:
    from pipeserve import kernels
    from pipeserve.node.node_server import KernelThreads

    before = kernels.get_threads()
    try:
        pool = KernelThreads("auto", (3, "3 nodes on this host, by the config's addresses"))
        cores = pool.cores
        assert pool.threads == max(1, cores // 3) and "by the config's addresses" in pool.reason
        pool.adopt(1)  # the coordinator: this node computes alone on its cores
        assert pool.threads == cores and kernels.get_threads() == cores
        assert "by the host ids the nodes report" in pool.reason
        pool.adopt(0)  # not known yet: nothing changes
        assert pool.threads == cores
        fixed = KernelThreads(2, (1, ""))
        fixed.adopt(3)
        assert (fixed.threads, fixed.reason) == (2, "set to 2 in the config")
    finally:
        kernels.set_threads(before)


def test_info_carries_the_count_to_the_pool_even_while_loading() -> None:
    from pipeserve import kernels
    from pipeserve.common.errors import StageUnavailableError
    from pipeserve.node.node_server import KernelThreads, ModelNodeServicer

    before = kernels.get_threads()
    try:
        pool = KernelThreads("auto", (3, ""))
        servicer = ModelNodeServicer("node1", pool)
        with pytest.raises(StageUnavailableError):  # no layers yet: Info answers UNAVAILABLE
            servicer.Info(pb.InfoRequest(host_sharing=1), None)  # type: ignore[arg-type]
        assert pool.sharing == 1 and pool.threads == pool.cores
    finally:
        kernels.set_threads(before)

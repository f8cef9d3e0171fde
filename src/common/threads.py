"""Who shares a machine's cores: the kernel threads a node takes and the micro-batch groups the
coordinator runs, both chosen from where the cluster's nodes run (`threads: auto`, `micro_batches: 0`).

The node server calls `choose_threads` at start (with `config_sharing`: its config's addresses
tell which nodes share its host) and again when the coordinator's health checks bring the count
the nodes' reported host ids give (`InfoRequest.host_sharing`); the coordinator's Cluster calls
`choose_micro_batches` and `sharing` on every health check. Everything but `usable_cores` and
`pool_id` (which read /proc and /sys) is plain arithmetic over its arguments.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

ThreadsSetting = Literal["auto"] | int
MAX_THREADS = 256  # the kernels' pool refuses more (src/kernels/qk.cpp: set_threads)
LOOPBACK = "loopback"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def choose_threads(
    cores: int, sharing: int, setting: ThreadsSetting, cores_why: str = "", sharing_why: str = ""
) -> tuple[int, str]:
    """Threads of a node's kernel pool and why: an explicit number as given; `auto`, the usable
    `cores` divided among the `sharing` node processes that compute on them at the same time,
    rounded down, at least 1 (and at most the pool's limit). `cores_why` and `sharing_why` (from
    `usable_cores` and `sharing`) go into the reason."""
    if setting != "auto":
        return int(setting), f"set to {setting} in the config"
    cores, sharing = max(1, cores), max(1, sharing)
    n = min(MAX_THREADS, max(1, cores // sharing))
    a = f" ({cores_why})" if cores_why else ""
    b = f" ({sharing_why})" if sharing_why else ""
    return n, f"auto: {cores} cores{a} / {sharing} node{'s' if sharing > 1 else ''} computing at once{b}"


def sharing(groups: int, parts_on_host: Sequence[int]) -> tuple[int, str]:
    """How many of the nodes on one host compute at the same time (`parts_on_host`: the model part
    of each, this node's included), and why. With one micro-batch group in flight the stages of
    the pipeline take turns, so only replicas of one part overlap (each step sends a request to
    one replica of each part: two replicas of a part on one host compute at once); with `groups`
    groups, up to `groups` steps are in flight, each on one node per part."""
    n = len(parts_on_host)
    if n <= 1:
        return 1, "the only node of the cluster on this host"
    most_replicas = max(Counter(parts_on_host).values())
    at_once = min(n, groups * most_replicas)
    if groups == 1:
        return at_once, f"{n} nodes on this host take turns: one micro-batch group"
    return at_once, f"{n} nodes on this host, {groups} micro-batch groups in flight"


def choose_micro_batches(setting: int, n_parts: int, hosts: Sequence[str], source: str) -> tuple[int, str]:
    """Groups in flight through the pipeline and why. An explicit `coordinator.micro_batches` wins;
    0 (auto) is one group when every node (`hosts`: one identity per node) is on one host: the
    stages compete for the same cores, and one stage computing on all of them beats several
    computing at once on a share each (README, Benchmarks: serving); one group per part when the
    nodes are on several hosts, so that every host is busy. `source` says where `hosts` came from."""
    if setting:
        return setting, f"set to {setting} in the config"
    if n_parts == 1:
        return 1, "one part: nothing to overlap"
    n_hosts = len(set(hosts))
    if n_hosts <= 1:
        return (
            1,
            f"all {len(hosts)} nodes on one host ({source}): one stage computes at a time, on all its cores",
        )
    return n_parts, f"nodes on {n_hosts} hosts ({source}): one group per part keeps every host busy"


def address_host(address: str) -> str:
    """The host part of a config address `host:port`, with every loopback name (localhost, 127.x)
    as one host: nodes a config puts on loopback run on the machine that reads it."""
    host = address.rsplit(":", 1)[0].lower()
    if host == "localhost" or host.startswith("127."):
        return LOOPBACK
    return host


def config_sharing(
    nodes: Sequence[tuple[str, str, int]], micro_batches: int, node_id: str, address: str, part: int
) -> tuple[int, str]:
    """`sharing` for a node as its config shows it, before any node has reported a host id: the
    configured nodes (`nodes`: (id, address, part) each) whose address host equals this node's
    `address` share its host (this node counted also when the config does not list it: a joined
    node), and the groups are what `choose_micro_batches` makes of the addresses' hosts."""
    others = [(a, p) for i, a, p in nodes if i != node_id]
    hosts = [address_host(address), *(address_host(a) for a, _ in others)]
    n_parts = len({part, *(p for _, p in others)})
    groups, _ = choose_micro_batches(micro_batches, n_parts, hosts, "")
    mine = hosts[0]
    n, why = sharing(groups, [part, *(p for a, p in others if address_host(a) == mine)])
    return n, f"{why}; by the config's addresses"


# ---- what this process runs on ----------------------------------------------------------------
def usable_cores(
    affinity: int | None = None, root: Path = CGROUP_ROOT, proc_cgroup: str | None = None
) -> tuple[int, str]:
    """Cores this process may use, and where the number comes from: its CPU affinity, capped by
    a cgroup CPU quota on its cgroup or an ancestor (v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`), rounded down, at least 1."""
    n = affinity if affinity is not None else len(os.sched_getaffinity(0))
    quota = cgroup_quota(root, proc_cgroup)
    if quota is not None and quota < n:
        return max(1, math.floor(quota)), f"cgroup quota {quota:g} of {n} in affinity"
    return max(1, n), "affinity"


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The smallest CPU quota, in cores, over this process's cgroup and its ancestors (inside a
    container the cgroup namespace makes its own cgroup the root); None when none is set."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    limits = []
    for d in _cgroup_dirs(root, proc_cgroup):
        limit = _read_v2(d / "cpu.max") if (d / "cpu.max").exists() else _read_v1(d)
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def _cgroup_dirs(root: Path, proc_cgroup: str) -> list[Path]:
    """Directories that may hold this process's CPU quota: for each line of /proc/self/cgroup
    that names the v2 hierarchy or a v1 cpu controller, its cgroup and every ancestor up to the
    hierarchy's root; the roots themselves always."""
    tops = {"": [root], "cpu": [root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"]}
    dirs: list[Path] = [*tops[""], *tops["cpu"]]
    for line in proc_cgroup.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        kind = "" if controllers == "" else "cpu" if "cpu" in controllers.split(",") else None
        if kind is None:
            continue
        rel = Path(path.lstrip("/"))
        for top in tops[kind]:
            for sub in [rel, *rel.parents]:
                if str(sub) not in ("", "."):
                    dirs.append(top / sub)
    return list(dict.fromkeys(dirs))


def _read_v2(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _read_v1(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def pool_id(
    boot_id_file: Path = Path("/proc/sys/kernel/random/boot_id"),
    confined: bool | None = None,
    hostname: str | None = None,
) -> str:
    """A short hash naming the cores this process draws from; node processes reporting the same
    id compete for the same cores. It is the running kernel's boot id (one per machine or VM,
    shared by every container on it), so nodes in separate containers on one machine without CPU
    limits count as one host. A process `confined` to part of the machine (a cgroup CPU quota, or
    an affinity smaller than the machine) adds its hostname: a container or pod with a CPU budget
    of its own is a host of its own, and the nodes inside one container share its budget."""
    try:
        base = boot_id_file.read_text().strip()
    except OSError:
        base = ""
    if not base:
        try:
            base = Path("/etc/machine-id").read_text().strip()
        except OSError:
            base = ""
    if confined is None:
        confined = cgroup_quota() is not None or len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    host = hostname if hostname is not None else socket.gethostname()
    key = f"{base or host}|{host if confined else ''}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]

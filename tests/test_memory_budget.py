"""Memory budgets enforced by the OS: real node processes, each in a memory cgroup of its own
(tests/memcg.py; v2 `memory.max` or v1 `memory.limit_in_bytes`), on a synthetic model (the
`llama-test` spec of modeling/synth.py: Llama 3.1's layout and Q4_K_M mix at width 512, cut to 16
layers; 114 MiB, most of it the embedding and the Q6_K head) and a limit chosen so that one node
cannot hold the model and a 3-way split can.

- One node under the limit refuses its share before mapping it, naming the numbers (it is not
  OOM-killed: the refusal comes from its own arithmetic on the file's header).
- Three nodes under the same limit (`layers: auto`, each `memory_limit: auto` read from its
  cgroup) serve it, their greedy tokens equal one unlimited engine's, and the OOM killer ended
  nothing in their cgroups: an under-estimated budget (weights, KV pool, runtime allowance)
  would show here as a kill, not a pass.
Skipped, with the reason, where no memory cgroup can be created (not root, no controller).
Also here, without cgroups: a node's refusal reaches its Info, and a node's load reads only its
share of the file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from pipeserve.common.memory import MiB, format_bytes, runtime_bytes
from pipeserve.modeling import synth
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.memcg import MemoryCgroup, Unavailable

pytestmark = pytest.mark.slow

N_LAYERS = 16
PROMPT = [128000, 1195, 2365, 6354, 16438]  # <|begin_of_text|> "the quick brown fox"
N_NEW = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write("llama-test", tmp_path_factory.mktemp("budget") / "llama-test.gguf", 0, N_LAYERS)


def _runtime(model: Path) -> int:
    """The runtime allowance a node of this model counts, with the config's defaults."""
    from pipeserve.common.config import CoordinatorConfig
    from pipeserve.common.model_files import resolve_model
    from pipeserve.modeling.layers import MLP_ROWS
    from pipeserve.modeling.loader import read_config
    from pipeserve.node.capacity import rope_table_bytes

    mc, c = read_config(resolve_model(str(model))), CoordinatorConfig()
    return runtime_bytes(
        mc.hidden_size,
        mc.intermediate_size,
        mc.vocab_size,
        rope_table_bytes(mc),
        c.max_batch_tokens,
        c.max_running,
        MLP_ROWS,
    )


def _cgroup(limit: int) -> MemoryCgroup:
    try:
        return MemoryCgroup.create(limit)
    except Unavailable as exc:
        pytest.skip(f"no memory cgroup can be created here: {exc}")


def test_the_cgroup_limit_is_enforced_by_the_os() -> None:
    """The premise of the test below: a process past the cgroup's limit is OOM-killed."""
    cg = _cgroup(64 * MiB)
    try:
        p = subprocess.run(
            [*cg.prefix(), sys.executable, "-c", "b = bytearray(256 << 20); print('survived')"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == -9 and "survived" not in p.stdout, (p.returncode, p.stdout, p.stderr[-500:])
        assert cg.oom_kills() >= 1
    finally:
        cg.remove()


def test_one_node_is_refused_and_three_nodes_under_the_same_limit_serve_the_model(
    model: Path, tmp_path: Path
) -> None:
    from pipeserve.common.model_files import resolve_model
    from pipeserve.launcher.procs import ProcessCluster
    from pipeserve.modeling.engine import StageEngine
    from pipeserve.modeling.generate import generate
    from pipeserve.modeling.loader import load_stage, model_weights
    from tests.harness import cluster_config

    weights = model_weights(resolve_model(str(model)))
    n = len(weights.layers)
    whole = weights.stage(0, n)
    third = max(weights.stage(p * n // 3, (p + 1) * n // 3) for p in range(3))  # the head's part
    runtime = _runtime(model)
    limit = (runtime + third + 24 * MiB) // 4096 * 4096  # a third fits, with room for KV; in pages
    assert runtime + whole > limit + 16 * MiB, "the model must not fit one node"

    # one node, the whole model: refused with the numbers, before it maps anything
    one = cluster_config(str(model), 1)
    cg = _cgroup(limit)
    pc = ProcessCluster(one, tmp_path / "one", node_prefix=lambda _: cg.prefix())
    try:
        proc = pc._spawn("node1", "node", "--id", "node1")
        rc = proc.wait(120)
        log = pc.log("node1", 60)
        assert rc == 1, (rc, log)  # its own refusal (SystemExit), not the OOM killer's SIGKILL (-9)
        assert f"node node1: part 0, layers [0, {n}) needs " in log, log
        assert f"limit {format_bytes(limit)} (auto: cgroup v" in log
        assert f"weights {format_bytes(whole)} + KV " in log and f"runtime {format_bytes(runtime)}" in log
        assert cg.oom_kills() == 0
    finally:
        pc.stop()
        cg.remove()

    # three nodes, each in its own cgroup with the same limit: placed, served, nothing killed
    cfg = cluster_config(str(model), 3, layers="auto")
    cgs = {node.id: _cgroup(limit) for node in cfg.nodes}
    pc = ProcessCluster(cfg, tmp_path / "three", node_prefix=lambda nid: cgs[nid].prefix())
    try:
        pc.start(timeout_s=180)
        with grpc.insecure_channel(cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            req = pb.GenerateRequest(
                prompt_token_ids=PROMPT,
                max_tokens=N_NEW,
                sampling=pb.SamplingParams(temperature=0),
                ignore_eos=True,
            )
            got = [t for m in stub.Generate(req, timeout=120) for t in m.token_ids]
            status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        nodes = sorted(status.nodes, key=lambda v: v.model_part)
        ranges = [(v.info.layers.start_layer, v.info.layers.end_layer) for v in nodes]
        assert ranges[0][0] == 0 and ranges[-1][1] == n and all(v.healthy for v in nodes), ranges
        for v, (s, e) in zip(nodes, ranges, strict=True):
            m = v.info.memory
            assert (m.limit_bytes, m.source) == (limit, "cgroup") and m.weights_bytes == weights.stage(s, e)
            assert m.weights_bytes + m.kv_bytes + m.runtime_bytes <= limit and v.info.load_seconds > 0
        assert all(pc.procs[v.id].poll() is None for v in nodes)
        kills = {nid: c.oom_kills() for nid, c in cgs.items()}
        assert kills == dict.fromkeys(cgs, 0), (kills, {nid: pc.log(nid) for nid in cgs})
    finally:
        pc.stop()
        for c in cgs.values():
            c.remove()

    # one engine with no limit: the same greedy tokens
    want = generate([StageEngine(load_stage(str(model)))], [PROMPT], N_NEW)[0]
    assert got == want, ranges


def test_a_refused_node_says_why_in_its_info(model: Path) -> None:
    """In a node's process the refusal is its load error: Info answers with it (the coordinator
    shows it as the node's error); `pipeserve node` exits with it."""
    from pipeserve.common.errors import ConfigError
    from pipeserve.node.node_server import NodeServer
    from tests.harness import cluster_config

    cfg = cluster_config(str(model), 2, node_defaults={"memory_limit": "200MiB", "cache_budget_tokens": 4096})
    srv = NodeServer(cfg, "node1").start(background_load=False)
    try:
        assert isinstance(srv.error, ConfigError) and srv.runner is None
        with grpc.insecure_channel(srv.address) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.ModelNodeStub(ch).Info(pb.InfoRequest(), timeout=10)
        text = err.value.details()  # type: ignore[attr-defined]
        assert "node node1: part 0, layers [0, 8) needs " in text and "limit 200.0 MiB" in text
        assert "(4096 tokens)" in text and "lower cache_budget_tokens" in text
    finally:
        srv.stop(0)


def _resident_pages(path: Path) -> np.ndarray:
    """Which pages of the file are in the page cache (mincore over a private map of it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return np.frombuffer(vec, dtype=np.uint8) & 1
    finally:
        del addr
        mm.close()


def test_a_node_reads_only_its_share_of_the_file(tmp_path: Path) -> None:
    """Loading layers [4, 8) of 16 from a cold page cache: the file's pages that become resident
    are its header and that share's tensors, plus the kernel's read-around (the device's
    read_ahead_kb) at the share's two ends and around the checksum's 16 samples of 4 KiB: no
    whole-file hash or read."""
    from pipeserve.common.model_files import open_gguf, release_file_caches
    from pipeserve.modeling.loader import load_stage

    # a file of its own: pages another test mapped in this process could not be dropped
    model = synth.write("llama-test", tmp_path / "share.gguf", 0, N_LAYERS)
    fd = os.open(model, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back first: only clean pages leave the page cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _resident_pages(model).mean() > 0.05:
        pytest.skip("the page cache keeps this file (tmpfs?): residency says nothing here")
    t0 = time.perf_counter()
    loaded = load_stage(str(model), (4, 8))
    took = time.perf_counter() - t0
    time.sleep(0.5)  # the share's read-ahead (MADV_WILLNEED) is asynchronous
    resident = _resident_pages(model)
    reader = open_gguf(model)
    page = mmap.PAGESIZE
    share = np.zeros_like(resident)
    share[: -(-reader.data_offset // page)] = 1  # the header
    for t in reader.tensors:
        if t.name.startswith(tuple(f"blk.{i}." for i in range(4, 8))):
            share[t.offset // page : -(-(t.offset + t.n_bytes) // page)] = 1
    outside = int((resident & (1 - share)).sum()) * page
    inside = int((resident & share).sum()) * page
    release_file_caches()
    dev = os.stat(model).st_dev
    try:
        ra = int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()) * 1024
    except (OSError, ValueError):
        ra = 8 * MiB
    rest = int((1 - share).sum()) * page  # the other 8 layers and the embedding: ~200 MiB
    assert outside <= min(2 * ra + 16 * MiB + MiB, rest // 4), (
        f"{outside / MiB:.1f} MiB outside the share read"
    )
    assert inside >= 0.5 * loaded.param_bytes, f"only {inside / MiB:.1f} MiB of the share resident"
    assert took < 30 and loaded.load_seconds > 0

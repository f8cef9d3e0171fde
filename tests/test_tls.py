"""mTLS on every gRPC link, and who may join.

Certificates come from `pipeserve.common.certs` (what `make certs` runs) into a temporary folder.
A whole cluster with TLS generates what the plaintext one does; a plaintext client, a client or a
node holding another CA's certificate, an expired certificate and a certificate for another name
are refused, each with a message naming the service; Join needs the certificate's name with TLS,
and the shared join token without.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from pipeserve.common import tls
from pipeserve.common.certs import make_ca, make_cert, make_cluster_certs
from pipeserve.common.config import Config, TlsConfig
from pipeserve.common.errors import ConfigError
from pipeserve.coordinator.coordinator_server import CoordinatorServer
from pipeserve.modeling.engine import StageEngine
from pipeserve.modeling.generate import generate
from pipeserve.node.node_server import NodeServer
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from pipeserve.tokenizer.tokenizer_server import TokenizerServer
from tests.harness import InProcessCluster, cluster_config

EMBEDDED = "smollm2-135m-instruct"
PROMPT = [1, 2364, 314, 253, 6134, 288, 2]


def tls_section(d: Path) -> dict[str, Any]:
    return {
        "enabled": True,
        "ca_file": str(d / "ca.crt"),
        "cert_file": str(d / "{name}.crt"),
        "key_file": str(d / "{name}.key"),
    }


def with_certs(cfg: Config, d: Path) -> Config:
    return cfg.model_copy(update={"tls": TlsConfig(**tls_section(d))})


def greedy(n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_token_ids=PROMPT, max_tokens=n, sampling=pb.SamplingParams(temperature=0), ignore_eos=True
    )


def generate_via(ch: grpc.Channel, n: int, timeout: float = 60) -> list[int]:
    return [t for m in pb_grpc.CoordinatorStub(ch).Generate(greedy(n), timeout=timeout) for t in m.token_ids]


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    cfg = cluster_config(EMBEDDED, 2, coordinator={"join_token": None})
    make_cluster_certs(cfg, d, ["node2j", "intruder"])
    cfg = with_certs(cfg, d)
    c = InProcessCluster(cfg, TokenizerServer(cfg), [NodeServer(cfg, n.id) for n in cfg.nodes]).start()
    yield c, d
    c.stop()


def test_a_whole_cluster_over_mtls_generates_the_reference(tls_cluster, smol_full) -> None:
    c, _ = tls_cluster
    with tls.sync_channel(c.cfg, "api", "coordinator", c.cfg.coordinator.address) as ch:
        got = generate_via(ch, 10)
    assert got == generate([StageEngine(smol_full)], [PROMPT], 10)[0]
    assert all(n.healthy for n in c.coordinator.cluster.nodes) and c.coordinator.cluster.tokenizer_healthy
    assert c.coordinator.cluster.tokenizer.pieces is not None  # the piece table came over mTLS too


def test_a_plaintext_client_is_refused(tls_cluster) -> None:
    c, _ = tls_cluster
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for address in [c.cfg.coordinator.address, c.cfg.tokenizer.address, *(n.address for n in c.cfg.nodes)]:
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, address  # type: ignore[attr-defined]
    with tls.sync_channel(c.cfg, "api", "coordinator", c.cfg.coordinator.address) as ch:  # the same, with TLS
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3).status == 1


def test_a_client_with_another_cas_certificate_is_refused(tls_cluster, tmp_path) -> None:
    c, _ = tls_cluster
    other = with_certs(c.cfg, tmp_path)
    make_cluster_certs(c.cfg, tmp_path)  # a CA of its own: a stranger's cluster
    with (
        tls.sync_channel(other, "api", "coordinator", c.cfg.coordinator.address) as ch,
        pytest.raises(grpc.RpcError) as e,
    ):
        pb_grpc.CoordinatorStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_join_needs_a_certificate_naming_the_node(tls_cluster) -> None:
    c, _ = tls_cluster
    addr = c.cfg.coordinator.address
    req = pb.JoinRequest(node_id="node2j", address="127.0.0.98:1", model_part=1)
    with (
        tls.sync_channel(c.cfg, "intruder", "coordinator", addr) as ch,  # a valid cert, another name
        pytest.raises(grpc.RpcError) as e,
    ):
        pb_grpc.CoordinatorStub(ch).Join(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "certificate for ['intruder'" in e.value.details()  # type: ignore[attr-defined]
    assert not any(n.id == "node2j" for n in c.coordinator.cluster.nodes)


def test_a_node_with_another_cas_certificate_cannot_be_forwarded_to(tmp_path) -> None:
    """node2 runs with a certificate of another cluster (self-consistent, so it starts): the
    coordinator's handshake with it fails, it is reported down naming it and TLS, and nothing is
    routed to it."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    cfg = cluster_config(EMBEDDED, 2)
    make_cluster_certs(cfg, ours)
    make_cluster_certs(cfg, theirs)
    cfg, stranger = with_certs(cfg, ours), with_certs(cfg, theirs)
    nodes = [NodeServer(cfg, "node1"), NodeServer(stranger, "node2")]
    c = InProcessCluster(cfg, TokenizerServer(cfg), nodes).start(wait_ready=False)
    try:
        node2 = next(n for n in c.coordinator.cluster.nodes if n.id == "node2")
        deadline = time.monotonic() + 20
        while "not ready" in node2.error or "contacted" in node2.error:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert not node2.healthy and not c.coordinator.cluster.ready
        problems = "; ".join(c.coordinator.cluster.problems)
        assert "node2" in problems and "TLS" in problems, problems
        with (
            tls.sync_channel(cfg, "api", "coordinator", cfg.coordinator.address) as ch,
            pytest.raises(grpc.RpcError) as e,
        ):
            generate_via(ch, 3, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert nodes[1].runner is not None and nodes[1].runner.stats.forwards_total == 0
    finally:
        c.stop()


def test_bad_own_certificates_stop_the_service_with_its_name(tmp_path) -> None:
    cfg = cluster_config(EMBEDDED, 1)
    make_cluster_certs(cfg, tmp_path)
    ok = with_certs(cfg, tmp_path)
    tls.check_certificate(ok.tls, "node1")  # what make certs wrote is valid
    ca = make_ca(tmp_path / "ca2")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    expired_dir = tmp_path / "expired"
    shutil.copytree(tmp_path, expired_dir, ignore=shutil.ignore_patterns("ca2", "expired"))
    from pipeserve.common.certs import load_ca

    make_cert(load_ca(tmp_path), "node1", expired_dir, days=30, not_before=old)
    with pytest.raises(ConfigError, match=r"node1: certificate .*node1.crt expired on .* UTC; renew it"):
        tls.check_certificate(with_certs(cfg, expired_dir).tls, "node1")
    with pytest.raises(ConfigError, match=r"node1: cannot read ca_file .*nowhere") as e:
        NodeServer(with_certs(cfg, tmp_path / "nowhere"), "node1").start()
    assert "make certs" in str(e.value)
    foreign = tmp_path / "foreign"
    shutil.copytree(tmp_path, foreign, ignore=shutil.ignore_patterns("ca2", "expired", "foreign"))
    make_cert(ca, "node1", foreign)
    with pytest.raises(ConfigError, match=r"node1: certificate .* was issued by .*not by the cluster's CA"):
        tls.check_certificate(with_certs(cfg, foreign).tls, "node1")
    shutil.copy(tmp_path / "tokenizer.crt", foreign / "node1.crt")
    shutil.copy(tmp_path / "tokenizer.key", foreign / "node1.key")
    with pytest.raises(
        ConfigError, match=r"node1: certificate .* is for \['tokenizer', 'localhost'.*not 'node1'"
    ):
        tls.check_certificate(with_certs(cfg, foreign).tls, "node1")
    shutil.copy(expired_dir / "node1.crt", expired_dir / "coordinator.crt")
    shutil.copy(expired_dir / "node1.key", expired_dir / "coordinator.key")

    async def coordinator() -> None:  # its channels need an event loop
        CoordinatorServer(with_certs(cfg, expired_dir))

    with pytest.raises(ConfigError, match=r"coordinator: certificate .* expired"):
        asyncio.run(coordinator())


def test_without_tls_join_needs_the_shared_token(tmp_path) -> None:
    async def main(token: str | None, sent: str) -> grpc.StatusCode | str:
        cfg = cluster_config(EMBEDDED, 1, coordinator={"join_token": token})
        co = CoordinatorServer(cfg)
        await co.server.start()
        try:
            async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                req = pb.JoinRequest(node_id="node1j", address="127.0.0.97:1", model_part=0, join_token=sent)
                try:
                    resp = await pb_grpc.CoordinatorStub(ch).Join(req, timeout=10)
                    return "accepted" if resp.accepted else resp.message
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name}: {exc.details()}"
        finally:
            await co.server.stop(0)
            await co.cluster.close()

    disabled = asyncio.run(main(None, ""))
    assert disabled.startswith("PERMISSION_DENIED: Join is disabled: set coordinator.join_token"), disabled
    assert (
        asyncio.run(main("s3cret", "wrong"))
        == "PERMISSION_DENIED: node 'node1j' gave a wrong or no join token"
    )
    assert asyncio.run(main("s3cret", "")).startswith("PERMISSION_DENIED")
    assert asyncio.run(main("s3cret", "s3cret")) == "accepted"

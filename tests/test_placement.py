"""`layers: auto`: the split by measured capacity (pure), and a cluster that places itself."""

from __future__ import annotations

import itertools

import pytest

from pipeserve.common.errors import ConfigError
from pipeserve.common.placement import Capacity, split_layers

GiB = 1 << 30


def cap(part: int, ms: float, free: int = 8 * GiB, layer: int = 10 << 20) -> Capacity:
    return Capacity(f"node{part + 1}", part, free, layer, ms)


def test_equal_nodes_split_evenly_and_cover_every_layer() -> None:
    assert split_layers(30, [cap(0, 2.0), cap(1, 2.0), cap(2, 2.0)]) == [(0, 10), (10, 20), (20, 30)]
    assert split_layers(31, [cap(0, 2.0), cap(1, 2.0), cap(2, 2.0)])[-1][1] == 31


def test_a_twice_as_fast_node_gets_twice_the_layers() -> None:
    ranges = split_layers(30, [cap(0, 1.0), cap(1, 2.0), cap(2, 2.0)])
    assert ranges[0] == (0, 15) and sorted(e - s for s, e in ranges[1:]) == [7, 8] and ranges[-1][1] == 30


def test_memory_caps_a_node_and_the_rest_goes_to_the_others() -> None:
    small = cap(1, 0.5, free=2 * 40 << 20, layer=10 << 20)  # room for 4 layers at the 50% reserve
    ranges = split_layers(30, [cap(0, 2.0), small, cap(2, 2.0)])
    assert ranges[1][1] - ranges[1][0] == 4 and ranges[-1][1] == 30
    assert [r[1] - r[0] for r in ranges] == [13, 4, 13]


def test_every_part_gets_a_layer_even_when_very_slow() -> None:
    ranges = split_layers(4, [cap(0, 1.0), cap(1, 1000.0), cap(2, 1.0)])
    assert all(e > s for s, e in ranges) and ranges[-1][1] == 4


def test_impossible_placements_are_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError, match="cannot hold the model's 30 layers"):
        split_layers(30, [cap(0, 1.0, free=100 << 20), cap(1, 1.0, free=100 << 20)])
    with pytest.raises(ConfigError, match="3 parts cannot split a model of 2 layers"):
        split_layers(2, [cap(0, 1.0), cap(1, 1.0), cap(2, 1.0)])
    with pytest.raises(ConfigError, match="one capacity per part"):
        split_layers(30, [cap(0, 1.0), cap(2, 1.0)])


def test_a_cluster_with_layers_auto_places_itself_and_generates_the_reference(tmp_path, smol_full) -> None:
    """Real processes: each node measures, reports, waits for its part's layers (the coordinator
    starts after the nodes), loads them; /api/cluster shows what each reported; the output equals
    the single-process engine."""
    import httpx

    from pipeserve.launcher.procs import ProcessCluster
    from pipeserve.modeling.engine import StageEngine
    from pipeserve.modeling.generate import generate
    from tests.harness import cluster_config, free_port

    cfg = cluster_config("smollm2-135m-instruct", 3, layers="auto", api={"port": free_port()})
    pc = ProcessCluster(cfg, tmp_path, with_api=True).start()
    try:
        view = httpx.get(f"http://127.0.0.1:{cfg.api.port}/api/cluster", timeout=10).json()
        nodes = sorted(view["nodes"], key=lambda n: n["part"])
        ranges = [tuple(n["layers"]) for n in nodes]
        assert ranges[0][0] == 0 and ranges[-1][1] == 30
        assert all(a[1] == b[0] and b[1] > b[0] for a, b in itertools.pairwise(ranges)), ranges
        caps = [n["capacity"] for n in nodes]
        assert all(c and c["ms_per_layer"] > 0 and c["layer_bytes"] > 0 and c["free_bytes"] > 0 for c in caps)
        assert "layers placed by capacity" in pc.log("coordinator", 200)
        body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{cfg.api.port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        from pipeserve.tokenizer.core import TokenizerCore

        tok = TokenizerCore.from_model("smollm2-135m-instruct")
        ids = tok.encode("The capital of France is")
        want = tok.decode(generate([StageEngine(smol_full)], [ids], 8)[0])
        assert r.json()["choices"][0]["text"] == want
    finally:
        pc.stop()


def test_a_restarted_coordinator_adopts_the_split_the_running_nodes_serve() -> None:
    """With `layers: auto` and no Place calls (the nodes loaded before this coordinator started),
    the first health check takes the layers the nodes report as the split, and Place answers it."""
    import asyncio

    from pipeserve.coordinator.cluster import Cluster
    from pipeserve.proto import model_service_pb2 as pb
    from tests.fake_stages import FakeStage, FakeTokenizer, fake_cluster_config

    cfg = fake_cluster_config(3).model_copy(update={"layers": "auto"})
    stages = {n.address: FakeStage(n.id, n.model_part, 3, layers_per_part=2) for n in cfg.nodes}

    async def main() -> None:
        cluster = Cluster(cfg, node_client=stages.__getitem__, tokenizer=FakeTokenizer())  # type: ignore[arg-type]
        assert cluster.part_layers(1) is None
        await cluster.refresh()
        assert cluster.ready, cluster.problems
        assert [cluster.part_layers(p) for p in range(3)] == [(0, 2), (2, 4), (4, 6)]
        late = pb.PlaceRequest(
            node_id="node2b", model_part=1, n_layers=6, capacity=pb.Capacity(ms_per_layer=1.0)
        )
        assert await cluster.place(late, wait_s=1) == (2, 4)  # a replica gets the running split

    asyncio.run(main())

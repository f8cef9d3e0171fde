"""`layers: auto`: the split by measured capacity and memory budgets (pure), the coordinator's
placement (waits for replicas, refuses with the shortfall), and a cluster that places itself."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

from pipeserve.common.errors import ConfigError
from pipeserve.common.memory import GiB, MiB, ModelWeights, parse_bytes
from pipeserve.common.placement import Capacity, _add_part, _Part, _raise_part
from pipeserve.common.placement import split_layers as split_shards

# a model of 30 layers of 100 MiB, a 50 MiB embedding (first stage) and a 60 MiB head (last)
MODEL = ModelWeights(tuple([100 * MiB] * 30), 50 * MiB, 60 * MiB)
KV = 10 * MiB  # KV pool per layer each node plans
RUNTIME = 200 * MiB


def split_layers(*args, **kw):  # type: ignore[no-untyped-def]
    """The split as half-open ranges (the tests compare ranges; the parts are Shards of the model)."""
    shards = split_shards(*args, **kw)
    assert all(s.n_layers == args[0] for s in shards)
    return [s.range for s in shards]


def cap(
    part: int, ms: float, limit: int = 8 * GiB, weights: ModelWeights = MODEL, node: str | None = None
) -> Capacity:
    return Capacity(node or f"node{part + 1}", part, limit, weights, ms, KV, RUNTIME)


def need(layers: int, first: bool = False, last: bool = False) -> int:
    """What a node of this model needs for `layers` layers (at the ends given)."""
    return RUNTIME + MODEL.extra(first, last) + layers * (100 * MiB + KV)


def test_equal_nodes_split_evenly_and_cover_every_layer() -> None:
    assert split_layers(30, [cap(0, 2.0), cap(1, 2.0), cap(2, 2.0)]) == [(0, 10), (10, 20), (20, 30)]


def test_a_twice_as_fast_node_gets_twice_the_layers() -> None:
    ranges = split_layers(30, [cap(0, 1.0), cap(1, 2.0), cap(2, 2.0)])
    assert ranges[0] == (0, 15) and sorted(e - s for s, e in ranges[1:]) == [7, 8] and ranges[-1][1] == 30


def test_uneven_budgets_cap_a_node_and_the_rest_goes_to_the_others() -> None:
    """node2 is the fastest but holds only 4 layers: the others take the rest evenly (the split
    whose slowest part is fastest within the budgets)."""
    small = cap(1, 0.5, limit=need(4))
    ranges = split_layers(30, [cap(0, 2.0), small, cap(2, 2.0)])
    assert [e - s for s, e in ranges] == [13, 4, 13]
    # every part within its budget, the head and embedding counted where they are
    caps = [
        cap(0, 2.0, limit=need(9, first=True)),
        cap(1, 2.0, limit=need(12)),
        cap(2, 2.0, limit=need(9, last=True)),
    ]
    ranges = split_layers(30, caps)
    assert ranges == [(0, 9), (9, 21), (21, 30)]
    assert all(c.need(s, e) <= c.limit_bytes for c, (s, e) in zip(caps, ranges, strict=True))


def test_layers_of_different_sizes_are_counted_one_by_one() -> None:
    """A Q4_K_M file mixes Q4_K and Q6_K layers: the budget sees each layer's own bytes."""
    mixed = ModelWeights(tuple((150 if i % 2 else 50) * MiB for i in range(10)), 0, 0)
    limit = RUNTIME + 250 * MiB + 3 * KV  # [0, 3) is 50 + 150 + 50 = 250 MiB; [3, 6) is 350 MiB
    caps = [cap(0, 1.0, limit, mixed), cap(1, 1.0, 4 * GiB, mixed)]
    ranges = split_layers(10, caps)
    assert ranges == [(0, 3), (3, 10)]


def test_a_part_with_replicas_fits_its_smallest_node() -> None:
    caps = [cap(0, 2.0), cap(1, 2.0), cap(1, 2.0, limit=need(6), node="node2b"), cap(2, 2.0)]
    ranges = split_layers(30, caps)
    assert ranges[1][1] - ranges[1][0] == 6 and [e - s for s, e in ranges] == [12, 6, 12]
    # the slowest replica sets the part's speed
    caps = [cap(0, 1.0), cap(0, 3.0, node="node1b"), cap(1, 1.0)]
    assert split_layers(30, caps)[0][1] in (7, 8)  # 30 x (1/3) / (1/3 + 1) = 7.5


def test_every_part_gets_a_layer_even_when_very_slow() -> None:
    four = ModelWeights((MiB,) * 4, 0, 0)
    ranges = split_layers(
        4, [cap(0, 1.0, weights=four), cap(1, 1000.0, weights=four), cap(2, 1.0, weights=four)]
    )
    assert all(e > s for s, e in ranges) and ranges[-1][1] == 4


def test_a_node_too_small_for_even_one_layer_is_named_with_the_numbers() -> None:
    tiny = cap(1, 1.0, limit=300 * MiB)  # one layer needs 200 + 100 + 10 = 310 MiB
    with pytest.raises(ConfigError) as err:
        split_layers(30, [cap(0, 1.0), tiny, cap(2, 1.0)])
    msg = str(err.value)
    assert "node node2 (part 1) cannot hold even one layer" in msg
    assert "needs 310.0 MiB there (weights 100.0 MiB + KV 10.0 MiB + runtime 200.0 MiB)" in msg
    assert "its limit is 300.0 MiB: raise its memory_limit to at least 310.0 MiB" in msg
    # the first part always holds the embedding with its first layer
    with pytest.raises(ConfigError, match=r"node node1 \(part 0\) .* needs 360.0 MiB"):
        split_layers(30, [cap(0, 1.0, limit=350 * MiB), cap(1, 1.0)])


def test_the_shortfall_names_the_layers_the_bytes_and_the_smallest_fixes() -> None:
    caps = [cap(0, 1.0, limit=1 * GiB), cap(1, 1.0, limit=1 * GiB), cap(2, 1.0, limit=1 * GiB)]
    with pytest.raises(ConfigError) as err:
        split_layers(30, caps)
    msg = str(err.value)
    # 1 GiB holds 7 layers with the embedding, 7 in the middle, 6 with the head
    assert (
        "cannot hold the model's 30 layers: they hold 20 (node1: 7 in 1.00 GiB, node2: 7 in 1.00 GiB, " in msg
    )
    assert "node3: 6 in 1.00 GiB), 10 layers short, 996.0 MiB more memory at the least" in msg
    raise_to = re.search(r"raise node3's memory_limit to ([\d.]+ GiB)", msg)
    add = re.search(r"add a node with memory_limit >= ([\d.]+ GiB) as a new part 3", msg)
    assert raise_to and add, msg
    # each fix works as stated: the split then fits
    fixed = [*caps[:2], cap(2, 1.0, limit=parse_bytes(raise_to.group(1).replace(" ", "")))]
    assert split_layers(30, fixed)[-1] == (14, 30)
    added = [*caps, cap(3, 1.0, limit=parse_bytes(add.group(1).replace(" ", "")), node="new")]
    assert split_layers(30, added)[-1][1] == 30
    # and is the smallest: a byte less does not fit
    parts = [_Part((c,)) for c in caps]
    extra, limit, raised = _raise_part(30, parts, 2)  # type: ignore[misc]
    assert [c.node_id for c in raised] == ["node3"] and extra == limit - 1 * GiB == 996 * MiB
    with pytest.raises(ConfigError):
        split_layers(30, [*caps[:2], cap(2, 1.0, limit=limit - 1)])
    new_limit, where = _add_part(30, parts)  # type: ignore[misc]
    assert where == 3 and new_limit == need(9, last=True)
    with pytest.raises(ConfigError):
        split_layers(30, [*caps, cap(3, 1.0, limit=new_limit - 1, node="new")])


def test_one_node_that_cannot_hold_the_model_is_told_what_would() -> None:
    with pytest.raises(ConfigError) as err:
        split_layers(30, [cap(0, 1.0, limit=1 * GiB)])
    msg = str(err.value)
    assert "they hold 6 (node1: 6 in 1.00 GiB), 24 layers short" in msg
    assert f"raise node1's memory_limit to {need(30, True, True) / GiB:.2f} GiB" in msg
    assert "or add a node with memory_limit >= " in msg and "as a new part 1" in msg


def test_impossible_placements_are_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError, match="3 parts cannot split a model of 2 layers"):
        small = ModelWeights((MiB, MiB), 0, 0)
        split_layers(2, [cap(0, 1.0, weights=small), cap(1, 1.0, weights=small), cap(2, 1.0, weights=small)])
    with pytest.raises(ConfigError, match="a capacity for every part"):
        split_layers(30, [cap(0, 1.0), cap(2, 1.0)])
    with pytest.raises(ConfigError, match="reported a model of 30 layers, not 31"):
        split_layers(31, [cap(0, 1.0), cap(1, 1.0)])


def _place_req(node: str, part: int, limit: int, ms: float = 1.0) -> object:
    from pipeserve.proto import model_service_pb2 as pb

    c = pb.Capacity(
        limit_bytes=limit,
        ms_per_layer=ms,
        layer_weight_bytes=list(MODEL.layers),
        first_bytes=MODEL.first,
        last_bytes=MODEL.last,
        kv_layer_bytes=KV,
        runtime_bytes=RUNTIME,
    )
    return pb.PlaceRequest(node_id=node, model_part=part, n_layers=30, capacity=c)


def test_the_coordinator_waits_for_replicas_and_refuses_budgets_that_cannot_hold_the_model() -> None:
    """Place: the split waits for every configured node (a replica's budget counts); a refusal
    reaches every waiting node and the cluster's problems, and the next reports try again."""
    from pipeserve.coordinator.cluster import Cluster
    from tests.fake_stages import FakeTokenizer, fake_cluster_config

    cfg = fake_cluster_config(2, replicas={1: 2}).model_copy(update={"layers": "auto"})

    async def main() -> None:
        cluster = Cluster(cfg, node_client=lambda a: None, tokenizer=FakeTokenizer())  # type: ignore[arg-type,return-value]
        first = asyncio.create_task(cluster.place(_place_req("node1", 0, 8 * GiB), wait_s=5))  # type: ignore[arg-type]
        second = asyncio.create_task(cluster.place(_place_req("node2", 1, 8 * GiB), wait_s=5))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        assert not first.done() and not second.done()  # node2b has not reported yet
        small = _place_req("node2b", 1, need(5, last=True))
        assert (await cluster.place(small, wait_s=5)).range == (25, 30)  # type: ignore[arg-type]
        assert (await first).range == (0, 25) and (await second).range == (25, 30)

        refusing = Cluster(cfg, node_client=lambda a: None, tokenizer=FakeTokenizer())  # type: ignore[arg-type,return-value]
        waits = [
            asyncio.create_task(refusing.place(_place_req(n, p, 1 * GiB), wait_s=5, replicas_wait_s=0.2))  # type: ignore[arg-type]
            for n, p in (("node1", 0), ("node2", 1))
        ]
        for w in waits:
            with pytest.raises(ConfigError, match="cannot hold the model's 30 layers"):
                await w
        assert any("cannot hold the model's 30 layers" in p for p in refusing._problems())
        # nodes restarted with larger limits are placed
        again = [
            asyncio.create_task(refusing.place(_place_req(n, p, 8 * GiB), wait_s=5, replicas_wait_s=0.2))  # type: ignore[arg-type]
            for n, p in (("node1", 0), ("node2", 1))
        ]
        assert [(await a).range for a in again] == [(0, 15), (15, 30)]
        assert not any("cannot hold" in p for p in refusing._problems())

    asyncio.run(main())


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
        assert all(
            c and c["ms_per_layer"] > 0 and c["layer_bytes"] > 0 and c["limit_bytes"] > 0 for c in caps
        )
        # each node's limit, what its share takes and what is left
        for n in nodes:
            m = n["memory"]
            assert m["limit_bytes"] == n["capacity"]["limit_bytes"] and m["limit_source"] in (
                "machine",
                "cgroup",
            )
            assert m["need_bytes"] == m["weights_bytes"] + m["kv_bytes"] + m["runtime_bytes"]
            assert m["left_bytes"] == m["limit_bytes"] - m["need_bytes"] >= 0
            assert m["weights_bytes"] == n["weights_bytes"] and n["load_s"] > 0
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
        assert [cluster.part_layers(p).range for p in range(3)] == [(0, 2), (2, 4), (4, 6)]  # type: ignore[union-attr]
        late = pb.PlaceRequest(
            node_id="node2b", model_part=1, n_layers=6, capacity=pb.Capacity(ms_per_layer=1.0)
        )
        assert (await cluster.place(late, wait_s=1)).range == (2, 4)  # a replica gets the running split

    asyncio.run(main())


def _min_room(caps: list[Capacity], ranges: list[tuple[int, int]]) -> float:
    return min(_Part((c,)).room(s, e) for c, (s, e) in zip(caps, ranges, strict=True))


def test_one_group_in_flight_places_for_the_most_kv_room_on_the_tightest_node() -> None:
    """balance='memory' (stages that take turns, one host): speeds do not matter, the split that
    leaves the tightest part the most bytes per layer for its KV pool wins; checked against every
    split of a small model, with uneven limits, ends of different sizes and noisy speeds."""
    weights = ModelWeights(tuple([100 * MiB] * 12), 300 * MiB, 500 * MiB)  # a large head, as Llama 3's
    for limits, speeds in (
        ((3 * GiB, 3 * GiB, 3 * GiB), (97.0, 73.0, 62.0)),
        ((2 * GiB, 4 * GiB, 3 * GiB), (1.0, 1.0, 1.0)),
        ((5 * GiB, 1536 * MiB, 2 * GiB), (1.0, 3.0, 2.0)),
    ):
        caps = [cap(p, speeds[p], limit=limits[p], weights=weights) for p in range(3)]
        got = split_layers(12, caps, balance="memory")
        every = [
            [(0, a), (a, b), (b, 12)]
            for a, b in itertools.combinations(range(1, 12), 2)
            if all(_Part((c,)).fits(s, e) for c, (s, e) in zip(caps, [(0, a), (a, b), (b, 12)], strict=True))
        ]
        assert got in every
        assert _min_room(caps, got) == max(_min_room(caps, r) for r in every), (limits, got)
    # equal limits and noisy speeds (three nodes measuring at once on two cores): the memory
    # balance ignores the speeds; the speed balance gives the node measured fastest the most layers,
    # and with it the head: the tightest room of the two splits
    caps = [cap(p, (97.0, 73.0, 62.0)[p], limit=3 * GiB, weights=weights) for p in range(3)]
    assert split_layers(12, caps, balance="memory") == [(0, 4), (4, 8), (8, 12)]
    by_speed = split_layers(12, caps)
    assert by_speed == [(0, 3), (3, 7), (7, 12)]
    assert _min_room(caps, by_speed) < _min_room(caps, [(0, 4), (4, 8), (8, 12)])
    # budgets that hold no split are refused the same way
    with pytest.raises(ConfigError, match="cannot hold the model's 12 layers"):
        split_layers(12, [cap(p, 1.0, limit=900 * MiB, weights=weights) for p in range(3)], balance="memory")
    with pytest.raises(ConfigError, match=r"node3 \(part 2\) cannot hold even one layer"):
        split_layers(12, [cap(p, 1.0, limit=700 * MiB, weights=weights) for p in range(3)], balance="memory")

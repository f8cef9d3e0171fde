"""The coordinator's view of the cluster: every node (from the config or joined at run time),
its health and Info, the tokenizer, and the checks that decide whether the pipeline may serve.

Used by the Scheduler to pick a node per part (least loaded healthy replica with room) and by
ClusterStatus. Node health comes from periodic Info calls and from failed forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Literal

import grpc

from pipeserve.common import tls
from pipeserve.common.config import Config
from pipeserve.common.errors import ConfigError, PipeserveError, StageUnavailableError
from pipeserve.common.grpc_util import channel_options, remote_error, rpc_error_text
from pipeserve.common.kvblocks import BLOCK_SIZE
from pipeserve.common.memory import ModelWeights
from pipeserve.common.placement import Capacity, split_layers
from pipeserve.common.shard import Shard
from pipeserve.common.threads import address_host, choose_micro_batches, sharing
from pipeserve.common.tokenizer_client import TokenizerClient
from pipeserve.coordinator.admission import blocks
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from pipeserve.proto import tokenizer_service_pb2 as tpb

log = logging.getLogger(__name__)

# `layers: auto`: once every part has reported, how long placement waits for the config's other
# nodes (replicas) to report too; a part's range must fit the smallest of its nodes that reported.
PLACE_REPLICAS_WAIT_S = 5.0


class NodeClient:
    """Typed client of one model node's unary calls; every call carries a deadline and every
    failure leaves as a domain exception (grpc_util.remote_error), never a gRPC error."""

    def __init__(
        self, address: str, rpc_timeout_s: float, max_message_mb: int, cfg: Config, name: str
    ) -> None:
        self.address, self.name = address, name
        self.channel = tls.aio_channel(cfg, "coordinator", name, address, channel_options(max_message_mb))
        self.stub = pb_grpc.ModelNodeStub(self.channel)
        self.rpc_timeout_s = rpc_timeout_s

    async def _call(self, method: str, request: object) -> object:
        try:
            return await getattr(self.stub, method)(request, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise remote_error(exc, f"node {self.name}", self.address, timeout_s=self.rpc_timeout_s) from None

    async def info(self, host_sharing: int = 0) -> pb.NodeInfo:
        """The node's Info; `host_sharing` tells it how many nodes compute on its cores at once."""
        return await self._call("Info", pb.InfoRequest(host_sharing=host_sharing))  # type: ignore[return-value]

    async def release(self, request_ids: list[str]) -> pb.ReleaseResponse:
        return await self._call("Release", pb.ReleaseRequest(request_ids=request_ids))  # type: ignore[return-value]

    async def lookup_prefix(self, request_id: str, token_ids: list[int]) -> int:
        req = pb.LookupPrefixRequest(request_id=request_id, token_ids=token_ids)
        return (await self._call("LookupPrefix", req)).cached_tokens  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.channel.close(grace=None)


@dataclass(eq=False)
class NodeHandle:
    id: str
    address: str
    part: int
    client: NodeClient
    joined: bool = False
    healthy: bool = False
    error: str = "not contacted yet"
    info: pb.NodeInfo | None = None
    draining: bool = False
    running: set[str] = field(default_factory=set)  # request ids routed here
    reserved_tokens: int = 0  # KV positions those requests hold now (block-rounded: holds), see Scheduler
    chunk_tokens: int = 0  # the most positions one step adds to a sequence (coordinator.max_batch_tokens)
    soft_budget: int | None = None  # lowered when the node ran out of blocks, until a request leaves
    down_since: float | None = None
    # exponential backoff before a node that failed is trusted again; a flapping node is banned
    failures: int = 0  # consecutive down-marks without a long healthy spell
    trust_after: float = 0.0  # monotonic time before which a healthy Info does not bring it back
    downs: list[float] = field(default_factory=list)  # times it was marked down (last minute)
    banned_until: float = 0.0
    healthy_since: float | None = None
    # chained hashes of the full KV blocks of prompts routed here (most recent last, bounded): the
    # prefixes this node likely holds, for routing a request to the replica that has its prefix
    prefixes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def remember(self, hashes: list[bytes], bound: int = 16384) -> None:
        for h in hashes:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > bound:
            self.prefixes.popitem(last=False)

    def prefix_blocks(self, hashes: list[bytes]) -> int:
        """How many of these leading blocks this node was sent (its likely cache hit)."""
        n = 0
        for h in hashes:
            if h not in self.prefixes:
                break
            n += 1
        return n

    def holds(self, tokens: int) -> int:
        """KV positions (whole blocks) a sequence of `tokens` positions holds on this node: all of
        them, or where every layer of its share has a sliding window (NodeInfo.kv_window), at
        most the window plus one chunk and a block (kv_cache.KVCachePool._slide gives up the rest)."""
        bs = self.info.cache_block_size if self.info and self.info.cache_block_size else BLOCK_SIZE
        window = self.info.kv_window if self.info else 0
        held = blocks(tokens, bs)
        return min(held, blocks(window + self.chunk_tokens, bs) + bs) if window else held

    @property
    def budget(self) -> int:
        full = self.info.cache_budget_tokens if self.info else 0
        return min(full, self.soft_budget) if self.soft_budget is not None else full

    def mark_down(self, reason: str, transport: bool = True) -> None:
        """Down until a health check answers again, and no sooner than the backoff allows:
        1, 2, 4 .. 30 s after consecutive failures; 3 downs within a minute ban it for 60 s."""
        now = time.monotonic()
        if self.healthy:
            log.warning("node %s (part %d) marked down: %s", self.id, self.part, reason)
            self.down_since = now
            if transport:
                if self.healthy_since is not None and now - self.healthy_since > 60:
                    self.failures = 0
                self.failures += 1
                self.trust_after = now + min(30.0, 2.0 ** (self.failures - 1))
                self.downs = [t for t in self.downs if now - t < 60] + [now]
                if len(self.downs) >= 3:
                    self.banned_until = now + 60.0
                    log.warning(
                        "node %s is flapping (%d downs in a minute): banned for 60 s",
                        self.id,
                        len(self.downs),
                    )
        self.healthy, self.error = False, reason
        self.healthy_since = None

    @property
    def backoff_s(self) -> float:
        """Seconds until this node may be trusted again (backoff or ban), 0 when it may."""
        return max(0.0, max(self.trust_after, self.banned_until) - time.monotonic())


class Cluster:
    def __init__(
        self,
        cfg: Config,
        node_client: Callable[[str], NodeClient] | None = None,
        tokenizer: TokenizerClient | None = None,
    ) -> None:
        """`node_client(address)` and `tokenizer` replace the gRPC clients (tests drive the
        scheduler over in-process fakes with the same methods)."""
        self.cfg = cfg
        c = cfg.coordinator
        self._node_client = node_client
        self.nodes: list[NodeHandle] = [
            NodeHandle(
                n.id, n.address, n.model_part, self._client(n.address, n.id), chunk_tokens=c.max_batch_tokens
            )
            for n in cfg.nodes
        ]
        self.n_parts = cfg.n_parts
        self.tokenizer = tokenizer or TokenizerClient(
            cfg.tokenizer.address, c.rpc_timeout_s, cfg, "coordinator"
        )
        self.tokenizer_info: tpb.TokenizerInfo | None = None
        self.tokenizer_healthy = False
        self.tokenizer_error = "not contacted yet"
        self.n_layers: int | None = None
        self.model_checksum = ""
        self.problems: list[str] = ["not checked yet"]
        self.changed = asyncio.Event()  # set when a node becomes healthy (wakes stalled requests)
        self.known_requests: Callable[[], Container[str]] | None = None  # set by the Scheduler
        # `layers: auto`: what each node reported (by node id), the split made from it, and why the
        # last attempt was refused (the nodes' budgets cannot hold the model)
        self.capacities: dict[str, Capacity] = {}
        self.auto_layers: list[Shard] | None = None
        self.placement_error = ""
        self._placed = asyncio.Event()
        self._all_reported = asyncio.Event()
        self._placing: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()
        # groups in flight and why, and per node id the nodes computing on its cores at once
        self.micro_batches, self.micro_batches_reason = 1, ""
        self.host_sharing: dict[str, int] = {}
        self._share_hosts()

    def _client(self, address: str, name: str) -> NodeClient:
        if self._node_client is not None:
            return self._node_client(address)
        c = self.cfg.coordinator
        return NodeClient(address, c.rpc_timeout_s, self.cfg.node_defaults.max_message_mb, self.cfg, name)

    # ---- health -------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Ask every node and the tokenizer for Info; recompute health and the serving problems."""
        infos = await asyncio.gather(
            *(n.client.info(self.host_sharing.get(n.id, 0)) for n in self.nodes), return_exceptions=True
        )
        try:
            self.tokenizer_info = await self.tokenizer.info()
            self.tokenizer_healthy, self.tokenizer_error = True, ""
        except PipeserveError as exc:
            self.tokenizer_healthy = False
            self.tokenizer_error = exc.message
        answered = [(n, i) for n, i in zip(self.nodes, infos, strict=True) if isinstance(i, pb.NodeInfo)]
        if answered:
            self.n_layers = Counter(i.layers.n_layers for _, i in answered).most_common(1)[0][0]
            if self.tokenizer_info and self.tokenizer_info.model_checksum:
                self.model_checksum = self.tokenizer_info.model_checksum
            else:
                self.model_checksum = Counter(i.model_checksum for _, i in answered).most_common(1)[0][0]
        if self.cfg.layers == "auto" and self.auto_layers is None and answered:
            self._adopt_layers(answered)
        became_healthy = False
        waiting: list[NodeHandle] = []  # answer well but are not trusted yet (backoff or ban)
        for n, info in zip(self.nodes, infos, strict=True):
            if not isinstance(info, pb.NodeInfo):
                n.mark_down(str(info) if isinstance(info, PipeserveError) else rpc_error_text(info))
                continue
            n.info = info
            problem = self._node_problem(n, info)
            if problem:
                n.mark_down(problem, transport=False)
            elif not n.healthy and n.backoff_s > 0:
                n.error = f"answers again; trusted in {n.backoff_s:.1f} s ({n.failures} recent failures)"
                if n.banned_until > time.monotonic():
                    n.error = f"banned for {n.banned_until - time.monotonic():.0f} s: flapping ({n.error})"
                waiting.append(n)
            elif not n.healthy:
                log.info("node %s (part %d) is healthy", n.id, n.part)
                self._trust(n)
                became_healthy = True
        # The backoff and the ban steer requests away from a node that failed while a replica can
        # take them; when its part has no other healthy node, failing every request of that part
        # is worse than trying it: the one that failed least lately is trusted early.
        for part in {w.part for w in waiting}:
            if not any(h.healthy for h in self.nodes if h.part == part):
                pick = min((w for w in waiting if w.part == part), key=lambda w: (len(w.downs), w.failures))
                log.warning(
                    "node %s (part %d) trusted early: the part has no other healthy node (%s)",
                    pick.id,
                    part,
                    pick.error,
                )
                self._trust(pick)
                became_healthy = True
        for n, info in zip(self.nodes, infos, strict=True):
            if isinstance(info, pb.NodeInfo) and n.healthy and self.known_requests is not None:
                orphans = [r for r in info.cached_request_ids if r not in self.known_requests()]
                if orphans:  # caches no request of ours owns (a coordinator restart): free them
                    self._orphans(n, orphans)
        self.problems = self._problems()
        self._share_hosts()
        if became_healthy:
            self.changed.set()

    def _share_hosts(self) -> None:
        """Choose micro_batches (threads.choose_micro_batches) and count, for every node, the nodes
        computing on its host at once (threads.sharing; sent with the next Info). Hosts are the host
        ids the nodes report once every node has reported one (nodes on one machine under different
        names, as Docker's, share it), until then the config's address hosts."""
        ids = [n.info.host_id if n.info else "" for n in self.nodes]
        reported = all(ids)
        hosts = ids if reported else [address_host(n.address) for n in self.nodes]
        source = "by the host ids the nodes report" if reported else "by the config's addresses"
        choice = choose_micro_batches(self.cfg.coordinator.micro_batches, self.n_parts, hosts, source)
        if choice[0] != self.micro_batches and self.micro_batches_reason:
            log.info("micro-batch groups %d -> %d: %s", self.micro_batches, *choice)
        self.micro_batches, self.micro_batches_reason = choice
        self.host_sharing = {}
        if reported:
            for n, h in zip(self.nodes, hosts, strict=True):
                parts = [m.part for m, hm in zip(self.nodes, hosts, strict=True) if hm == h]
                self.host_sharing[n.id] = sharing(self.micro_batches, parts)[0]

    @staticmethod
    def _trust(n: NodeHandle) -> None:
        n.healthy, n.error, n.down_since = True, "", None
        n.healthy_since = time.monotonic()

    def _node_problem(self, n: NodeHandle, info: pb.NodeInfo) -> str:
        if info.model_checksum != self.model_checksum:
            return (
                f"node {n.id} holds model {info.model_name} (checksum {info.model_checksum}), "
                f"not the cluster's model (checksum {self.model_checksum})"
            )
        if info.model_part != n.part and not n.joined:
            return f"node {n.id} serves model_part {info.model_part} but the config says {n.part}"
        want = self.part_layers(n.part)
        got = (info.layers.start_layer, info.layers.end_layer)
        if want is not None and got != want.range:
            return f"node {n.id} serves layers [{got[0]}, {got[1]}) but part {n.part} is layers {want}"
        return ""

    def _orphans(self, n: NodeHandle, rids: list[str]) -> None:
        log.warning("node %s holds caches of %d unknown requests: releasing %s", n.id, len(rids), rids[:5])

        async def release() -> None:
            with contextlib.suppress(PipeserveError):
                await n.client.release(rids)

        task = asyncio.create_task(release())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def part_layers(self, part: int) -> Shard | None:
        if self.cfg.layers == "auto":
            return self.auto_layers[part] if self.auto_layers else None
        if self.n_layers is None:
            return None
        return self.cfg.part_layers(part, self.n_layers)

    # ---- placement (`layers: auto`) ------------------------------------------------------------
    async def place(
        self, req: pb.PlaceRequest, wait_s: float = 300.0, replicas_wait_s: float = PLACE_REPLICAS_WAIT_S
    ) -> Shard:
        """The layers of req's part. The split is made once every part has reported and either
        every configured node has or `replicas_wait_s` more passed (a part's range must fit all
        its replicas); later reports (replicas, restarts) get the same split. When the budgets
        cannot hold the model every waiting node gets the error and the next reports try again."""
        if self.cfg.layers != "auto":
            raise ConfigError(
                "the cluster's config has layers='even': nodes take their layers from the config"
            )
        if req.model_part >= self.n_parts:
            raise ConfigError(
                f"part {req.model_part} does not exist (the model is split into {self.n_parts} parts)"
            )
        if self.auto_layers is None:
            self.capacities[req.node_id] = capacity_from_pb(req.node_id, req.model_part, req.capacity)
            if {n.id for n in self.cfg.nodes} <= set(self.capacities):
                self._all_reported.set()
            if self._placing is None and {c.part for c in self.capacities.values()} == set(
                range(self.n_parts)
            ):
                self._placing = asyncio.create_task(self._split(req.n_layers, replicas_wait_s))
            placing = self._placing
            if placing is None:
                try:
                    await asyncio.wait_for(self._placed.wait(), wait_s)
                except TimeoutError:
                    missing = sorted(set(range(self.n_parts)) - {c.part for c in self.capacities.values()})
                    raise StageUnavailableError(
                        f"placement waits for parts {missing} to report their capacity"
                    ) from None
            else:
                await asyncio.shield(placing)  # raises the refusal, for every waiting node
        if self.auto_layers is None:
            raise ConfigError(self.placement_error or "the layers could not be placed")
        return self.auto_layers[req.model_part]

    async def _split(self, n_layers: int, replicas_wait_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_reported.wait(), replicas_wait_s)
        caps = list(self.capacities.values())
        self._share_hosts()  # micro_batches from the config's addresses while the nodes load
        # one group in flight: the stages take turns, every split costs the same time per step,
        # so the split leaves the most KV room; several groups: the slowest stage sets the pace
        balance: Literal["speed", "memory"] = "memory" if self.micro_batches == 1 else "speed"
        try:
            self.auto_layers = split_layers(n_layers, caps, balance)
        except ConfigError as exc:
            self.placement_error = f"layers: auto: {exc}"
            log.error("placement refused: %s", exc)
            # the nodes that reported exit with the error; the next reports start a new attempt
            self.capacities.clear()
            self._all_reported.clear()
            self._placing = None
            self._wake_waiters()
            raise ConfigError(self.placement_error) from None
        self.placement_error = ""
        log.info(
            "layers placed by capacity (%s: %s): %s",
            balance,
            "the most KV room, stages take turns" if balance == "memory" else "in proportion to speed",
            ", ".join(
                f"part {p} {s} ("
                + ", ".join(
                    f"{c.node_id}: {c.ms_per_layer:.2f} ms/layer, needs {c.need(*s.range) / 2**30:.2f} of "
                    f"{c.limit_bytes / 2**30:.2f} GiB"
                    for c in caps
                    if c.part == p
                )
                + ")"
                for p, s in enumerate(self.auto_layers)
            ),
        )
        self._placed.set()

    def _wake_waiters(self) -> None:
        """Let nodes waiting for a split that was refused see the refusal (their wait ends)."""
        self._placed.set()
        self._placed = asyncio.Event()

    def _adopt_layers(self, answered: list[tuple[NodeHandle, pb.NodeInfo]]) -> None:
        """After a coordinator restart with `layers: auto`: take the split the loaded nodes serve."""
        by_part = {
            n.part: (i.layers.start_layer, i.layers.end_layer) for n, i in answered if i.layers.end_layer
        }
        if len(by_part) < self.n_parts:
            return
        ranges = [by_part[p] for p in range(self.n_parts)]
        n = self.n_layers or ranges[-1][1]
        if (
            ranges[0][0] == 0
            and ranges[-1][1] == n
            and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        ):
            self.auto_layers = [Shard(a, b, n) for a, b in ranges]
            self._placed.set()

    def _problems(self) -> list[str]:
        out = []
        if not self.tokenizer_healthy:
            out.append(f"tokenizer at {self.cfg.tokenizer.address} is unavailable: {self.tokenizer_error}")
        elif (
            self.model_checksum
            and self.tokenizer_info
            and self.tokenizer_info.model_checksum != self.model_checksum
        ):
            out.append("the tokenizer belongs to another model")
        if self.placement_error and self.auto_layers is None:
            out.append(self.placement_error)
        for part in range(self.n_parts):
            if not any(n.healthy for n in self.nodes if n.part == part):
                down = [f"{n.id} ({n.error})" for n in self.nodes if n.part == part]
                out.append(f"part {part} has no healthy node: {'; '.join(down)}")
        return out

    @property
    def ready(self) -> bool:
        return not self.problems

    def part_down_message(self, part: int) -> str:
        down = [n.id for n in self.nodes if n.part == part]
        layers = self.part_layers(part)
        span = f" (layers {layers})" if layers else ""
        return f"model part {part}{span} is unavailable: node(s) {', '.join(down)} down"

    # ---- routing ------------------------------------------------------------------------------
    def pick(self, part: int, tokens: int, prefix: list[bytes] | None = None) -> NodeHandle | None:
        """The healthy replica of `part` with room for a sequence of `tokens` positions (what it
        holds there: NodeHandle.holds) that holds
        the longest run of the request's prefix blocks (`prefix`: their chained hashes) among the
        least loaded, then the least loaded; None when no replica is healthy. When all are full,
        the least full one (the caller waits)."""
        live = [n for n in self.nodes if n.part == part and n.healthy and not n.draining]
        if not live:
            return None
        # the prefix only decides between replicas about as loaded as the least loaded one (within
        # one request): a shared system prompt must not pile every request onto one replica
        least = min(len(n.running) for n in live)
        return min(
            live,
            key=lambda n: (
                n.reserved_tokens + n.holds(tokens) > n.budget,
                len(n.running) > least + 1,
                -n.prefix_blocks(prefix) if prefix else 0,
                len(n.running),
                n.reserved_tokens,
            ),
        )

    def down_part(self) -> int | None:
        """The first part no healthy node serves, if any."""
        return next((p for p in range(self.n_parts) if self.pick(p, 0) is None), None)

    def max_budget(self, part: int) -> int:
        """The largest KV budget among the part's nodes, in tokens; 0 (no request is too long for
        the part) when each of them forgets what falls behind a sliding window and holds a whole
        window plus a chunk within its budget."""
        infos = [(n, n.info) for n in self.nodes if n.part == part and n.info]
        if infos and all(i.kv_window and n.holds(1 << 62) <= i.cache_budget_tokens for n, i in infos):
            return 0
        return max((i.cache_budget_tokens for _, i in infos), default=0)

    def add_node(self, node_id: str, address: str, part: int) -> NodeHandle:
        if part >= self.n_parts:
            raise ValueError(f"part {part} does not exist (the model is split into {self.n_parts} parts)")
        for n in self.nodes:
            if n.id == node_id or n.address == address:
                if n.joined or n.id == node_id:
                    n.draining = False
                    return n
                raise ValueError(f"address {address} is already used by node {n.id}")
        node = NodeHandle(
            node_id,
            address,
            part,
            self._client(address, node_id),
            joined=True,
            chunk_tokens=self.cfg.coordinator.max_batch_tokens,
        )
        self.nodes.append(node)
        log.info("node %s joined for part %d at %s", node_id, part, address)
        return node

    async def close(self) -> None:
        await asyncio.gather(
            *(n.client.close() for n in self.nodes), self.tokenizer.close(), return_exceptions=True
        )


def capacity_from_pb(node_id: str, part: int, c: pb.Capacity) -> Capacity:
    """What a node reported for placement, as common/placement.py takes it."""
    weights = ModelWeights(tuple(c.layer_weight_bytes), c.first_bytes, c.last_bytes, c.shared_bytes)
    return Capacity(node_id, part, c.limit_bytes, weights, c.ms_per_layer, c.kv_layer_bytes, c.runtime_bytes)

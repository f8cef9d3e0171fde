"""The model node's gRPC server: a thin servicer over StageRunner.

`pipeserve node --id node1` starts it: the node reads the config, works out its layer range
from its model_part, starts listening (health NOT_SERVING while loading), loads only its layers,
then reports SERVING. The servicer converts protobuf <-> domain types and nothing else.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from typing import Any

import grpc

from pipeserve import kernels
from pipeserve.common import threads as host
from pipeserve.common import tls
from pipeserve.common.config import Config
from pipeserve.common.errors import ConfigError, PipeserveError, StageUnavailableError
from pipeserve.common.grpc_util import channel_options, listen, set_serving, sync_server
from pipeserve.common.memory import format_bytes, node_limit
from pipeserve.common.shard import Shard
from pipeserve.modeling.layers import set_lossy_int8
from pipeserve.modeling.loader import load_stage, read_config
from pipeserve.modeling.source import release_file_caches, resolve_model
from pipeserve.node import codec
from pipeserve.node.capacity import NodeBudget
from pipeserve.node.capacity import measure as measure_capacity
from pipeserve.node.chain import ChainWorker
from pipeserve.node.runner import StageRunner
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = "pipeserve.v1.ModelNode"


class KernelThreads:
    """A node's kernel-pool size and why (src/common/threads.py). Chosen at start from the config:
    an explicit number, or `auto`: the process's usable cores divided among the nodes that compute
    on this host at the same time, as the config's addresses tell (nodes on loopback, or on one
    address host, share it). The coordinator sees more: every node reports the id of the cores it
    draws from (`host_id`), which also joins nodes on one machine under different names (Docker
    service names); once every node has reported, each health check carries its count and `adopt`
    resizes the pool when the count differs. The pool is per process: nodes that share a process
    (tests) compute the same count and set the same size."""

    def __init__(self, setting: host.ThreadsSetting, first_sharing: tuple[int, str]) -> None:
        self.setting = setting
        self.cores, self.cores_why = host.usable_cores()
        self.host_id = host.pool_id()
        self.sharing = first_sharing[0]
        self.threads, self.reason = host.choose_threads(
            self.cores, first_sharing[0], setting, self.cores_why, first_sharing[1]
        )
        self._lock = threading.Lock()

    def apply(self) -> None:
        with self._lock:
            kernels.set_threads(self.threads)

    def adopt(self, sharing: int) -> None:
        """The coordinator counts `sharing` nodes computing at once on this node's cores."""
        with self._lock:
            if self.setting != "auto" or sharing < 1 or sharing == self.sharing:
                return
            old = self.threads
            self.sharing = sharing
            self.threads, self.reason = host.choose_threads(
                self.cores,
                sharing,
                self.setting,
                self.cores_why,
                "the coordinator's count, by the host ids the nodes report",
            )
            if self.threads != old:
                log.info("kernel threads %d -> %d: %s", old, self.threads, self.reason)
                kernels.set_threads(self.threads)


class ModelNodeServicer(pb_grpc.ModelNodeServicer):
    def __init__(self, node_id: str, threads: KernelThreads | None = None) -> None:
        self.node_id = node_id
        self.threads = threads  # adopts the coordinator's count of the nodes sharing this host
        self._runner: StageRunner | None = None  # set once the layers are loaded
        self.chain: ChainWorker | None = None  # the chain data path's worker, with the runner
        self.capacity: pb.Capacity | None = None  # measured before loading (`layers: auto`)
        self.memory: pb.MemoryBudget | None = None  # its limit and its share's need, once checked
        self.load_error: PipeserveError | None = None  # why loading failed (Info answers with it)
        self.int8 = False  # the opt-in lossy int8 mode is on for some of its layers (`lossy_int8`)
        self._subscribers: dict[str, queue.SimpleQueue[pb.StepResult | None]] = {}
        self._subs_lock = threading.Lock()

    # ---- the chain data path -------------------------------------------------------------------
    def Relay(self, request_iterator: Any, context: grpc.ServicerContext) -> pb.RelayAck:
        """A link from the coordinator or a previous part's node: queue every step it brings."""
        for msg in request_iterator:
            chain = self.chain
            if chain is None:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node_id} is still loading its layers")
                raise AssertionError("unreachable")
            chain.submit(msg)
        return pb.RelayAck()

    def Subscribe(self, request: pb.SubscribeRequest, context: grpc.ServicerContext) -> Any:
        """The coordinator's results stream: yields what `report` queues for it until it hangs up."""
        q: queue.SimpleQueue[pb.StepResult | None] = queue.SimpleQueue()
        with self._subs_lock:
            old = self._subscribers.get(request.coordinator_id)
            self._subscribers[request.coordinator_id] = q
        if old is not None:
            old.put(None)  # a reconnect replaces the previous stream
        context.add_callback(lambda: q.put(None))
        context.send_initial_metadata(())  # the coordinator counts the stream open from here
        try:
            while (res := q.get()) is not None:
                yield res
        finally:
            with self._subs_lock:
                if self._subscribers.get(request.coordinator_id) is q:
                    del self._subscribers[request.coordinator_id]

    def report(self, coordinator_id: str, result: pb.StepResult) -> None:
        with self._subs_lock:
            q = self._subscribers.get(coordinator_id)
        if q is None:
            log.warning("no subscriber %s for the result of step %s: dropped", coordinator_id, result.step_id)
            return
        q.put(result)

    @property
    def runner(self) -> StageRunner:
        if self._runner is None:
            if self.load_error is not None:
                raise self.load_error
            raise StageUnavailableError(f"node {self.node_id} is still loading its layers", node=self.node_id)
        return self._runner

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        chunks = codec.chunks_from_pb(request.chunks)
        hidden = codec.decode_tensor(request.hidden) if request.HasField("hidden") else None
        out_dtype = codec.wire_dtype(request.output_dtype)
        out = self.runner.forward(chunks, hidden)
        return pb.ForwardResponse(
            hidden=codec.encode_tensor(out.hidden, out_dtype) if out.hidden is not None else None,
            tokens=codec.samples_to_pb(out.samples),
            forward_ms=out.forward_ms,
            cache_used_tokens=self.runner.cache_used_tokens,
        )

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        freed = self.runner.release(list(request.request_ids))
        shard = self.runner.loaded.shard
        for rid, n in freed.items():  # one line per request per node: what this stage held for it
            log.info(
                "released",
                extra={
                    "request_id": rid,
                    "part": self.runner.part,
                    "layers": [shard.start_layer, shard.end_layer],
                    "tokens_freed": n,
                },
            )
        return pb.ReleaseResponse(
            released=[pb.ReleasedCache(request_id=r, tokens_freed=n) for r, n in freed.items()],
            cache_used_tokens=self.runner.cache_used_tokens,
        )

    def LookupPrefix(
        self, request: pb.LookupPrefixRequest, context: grpc.ServicerContext
    ) -> pb.LookupPrefixResponse:
        return pb.LookupPrefixResponse(
            cached_tokens=self.runner.lookup_prefix(request.request_id, list(request.token_ids))
        )

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        if self.threads is not None and request.host_sharing:
            self.threads.adopt(request.host_sharing)
        info = node_info(self.runner)
        if self.capacity is not None:
            info.capacity.CopyFrom(self.capacity)
        if self.memory is not None:
            info.memory.CopyFrom(self.memory)
        if self.threads is not None:
            info.host_id, info.threads_reason = self.threads.host_id, self.threads.reason
        if self.int8:
            info.kernel_int8 = kernels.int8_path()
        info.batch_invariant = kernels.get_batch_invariant()
        return info


def node_info(r: StageRunner) -> pb.NodeInfo:
    ld, eng = r.loaded, r.engine
    snap = r.cache_snapshot()
    return pb.NodeInfo(
        node_id=r.node_id,
        model_part=r.part,
        model_name=ld.source.name,
        model_checksum=ld.checksum,
        arch=ld.cfg.arch,
        layers=pb.LayerRange(
            start_layer=ld.shard.start_layer, end_layer=ld.shard.end_layer, n_layers=ld.shard.n_layers
        ),
        dtype="float32",
        hidden_size=ld.cfg.hidden_size,
        vocab_size=ld.cfg.vocab_size,
        max_context=eng.max_context,
        cache_budget_tokens=eng.cache.budget_tokens,
        kv_dtype=eng.cache.kv_dtype,
        kv_window=eng.cache.window or 0,
        cache_used_tokens=snap.used_tokens,
        active_requests=len(snap.request_ids),
        rss_bytes=r.rss_bytes(),
        param_bytes=ld.param_bytes,
        forwards_total=r.stats.forwards_total,
        forward_ms_total=r.stats.forward_ms_total,
        last_forward_ms=r.stats.last_forward_ms,
        load_seconds=ld.load_seconds,
        in_flight=r.stats.in_flight,
        weight_types=ld.tensor_types,
        kernel_isa=kernels.get_isa(),
        kernel_threads=kernels.get_threads(),
        cache_block_size=eng.cache.block_size,
        cache_blocks_total=eng.cache.n_blocks,
        cache_blocks_free=snap.free_blocks,
        prefix_cached_blocks=snap.cached_blocks,
        prefix_hit_tokens=snap.hit_tokens,
        prefix_lookup_tokens=snap.lookup_tokens,
        cached_request_ids=snap.request_ids,
        cache_resident_bytes=snap.resident_bytes,
    )


class NodeServer:
    """A running node: gRPC server + runner. `start()` returns once it listens; loading follows."""

    def __init__(
        self,
        cfg: Config,
        node_id: str,
        address: str | None = None,
        part: int | None = None,
        layers: tuple[int, int] | None = None,
        listen_address: str | None = None,
    ) -> None:
        """`address` is where peers reach the node; it listens there too unless `listen_address`
        says otherwise (behind a proxy, NAT or port-forward)."""
        self.cfg = cfg
        known = next((n for n in cfg.nodes if n.id == node_id), None)
        self.node_id = node_id
        self.address = address or (known.address if known else "")
        if not self.address:
            raise ValueError(f"node {node_id!r} is not in the config: give its --address")
        self.part = part if part is not None else (known.model_part if known else 0)
        setting = (known.threads if known else None) or cfg.node_defaults.threads
        configured = [(n.id, n.address, n.model_part) for n in cfg.nodes]
        self.threads = KernelThreads(
            setting,
            host.config_sharing(configured, cfg.coordinator.micro_batches, node_id, self.address, self.part),
        )
        self.budget = (known.cache_budget_tokens if known else None) or cfg.node_defaults.cache_budget_tokens
        self.memory_limit = (known.memory_limit if known else None) or cfg.node_defaults.memory_limit
        mine = host.address_host(self.address)  # nodes the config puts on this host share its memory
        self.host_nodes = 1 + sum(
            1 for n in cfg.nodes if n.id != node_id and host.address_host(n.address) == mine
        )
        lossy = known.lossy_int8 if known else None
        self.lossy_int8 = cfg.node_defaults.lossy_int8 if lossy is None else lossy
        self.kv_dtype = (known.kv_dtype if known else None) or cfg.node_defaults.kv_dtype
        self.layers = layers
        self.runner: StageRunner | None = None
        self.loaded_event = threading.Event()
        self.error: BaseException | None = None
        self.server = sync_server(16, "node-rpc", cfg.node_defaults.max_message_mb)
        self.servicer = ModelNodeServicer(node_id, self.threads)
        pb_grpc.add_ModelNodeServicer_to_server(self.servicer, self.server)
        bind = listen_address or self.address
        self.health, self.port = listen(self.server, SERVICE, bind, f"node {node_id}", cfg, node_id)

    def start(self, background_load: bool = True) -> NodeServer:
        self.server.start()
        log.info("node %s listening on %s (part %d); loading", self.node_id, self.address, self.part)
        if background_load:
            threading.Thread(target=self._load, name="loader", daemon=True).start()
        else:
            self._load()
        return self

    def _load(self) -> None:
        try:
            self.threads.apply()  # every op of a forward runs on the kernels' pool
            log.info(
                "node %s: %d kernel threads, %s", self.node_id, self.threads.threads, self.threads.reason
            )
            source = resolve_model(self.cfg.model_name)
            model_cfg = read_config(source)
            n_layers = model_cfg.n_layers
            budget = NodeBudget.of(
                self.node_id,
                self.part,
                source,
                model_cfg,
                node_limit(self.memory_limit, self.host_nodes),
                self.budget,
                self.cfg.coordinator.max_batch_tokens,
                self.cfg.coordinator.max_running,
                self.kv_dtype,
            )
            if self.layers is None and self.cfg.layers == "auto":
                self.servicer.capacity = measure_capacity(source, n_layers, budget)
                layers = self._place(self.servicer.capacity, n_layers)
            else:
                layers = (
                    Shard(*self.layers, n_layers)
                    if self.layers
                    else self.cfg.part_layers(self.part, n_layers)
                )
            need = budget.check(layers)  # before any of its weights is mapped
            self.servicer.memory = budget.to_pb(need)
            log.info(
                "node %s: part %d, layers %s need %s under a limit of %s (%s): %s",
                self.node_id,
                self.part,
                layers,
                format_bytes(need.total),
                format_bytes(budget.limit.bytes),
                budget.limit.reason,
                need.describe(),
            )
            # process-wide: every exact matmul gives each row its alone bits (kernels.set_batch_invariant)
            kernels.set_batch_invariant(self.cfg.node_defaults.batch_invariant)
            loaded = load_stage(source, layers)
            release_file_caches()
            if self.lossy_int8:  # per node: it sets the flag on its own layers' matmuls only
                on, total = set_lossy_int8(loaded.model, True)
                self.servicer.int8 = on > 0
                log.info(
                    "node %s: lossy int8 mode on %d of %d linear layers (%s kernels; the rest exact)",
                    self.node_id,
                    on,
                    total,
                    kernels.int8_path(),
                )
            self.runner = StageRunner(
                self.node_id,
                self.part,
                loaded,
                need.kv_tokens,
                self.cfg.node_defaults.cache_ttl_s,
                self.cfg.max_context,
                self.kv_dtype,
            )
            self.servicer._runner = self.runner
            mb = self.cfg.node_defaults.max_message_mb
            self.servicer.chain = ChainWorker(
                self.runner,
                self.node_id,
                lambda hop: tls.sync_channel(
                    self.cfg, self.node_id, hop.node_id, hop.address, channel_options(mb)
                ),
                self.servicer.report,
            )
            set_serving(self.health, [SERVICE], True)
            log.info(
                "node %s serving layers %s of %d",
                self.node_id,
                layers,
                n_layers,
                extra={
                    "load_s": round(loaded.load_seconds, 2),
                    "param_mib": round(loaded.param_bytes / 2**20, 1),
                },
            )
        except BaseException as exc:  # keep the reason; health stays NOT_SERVING
            self.error = exc
            self.servicer.load_error = (
                exc
                if isinstance(exc, PipeserveError)
                else PipeserveError(f"node {self.node_id} failed to load: {exc}")
            )
            if isinstance(exc, ConfigError):  # a refusal (memory budget, placement): its text says it all
                log.error("node %s cannot load: %s", self.node_id, exc)
            else:
                log.exception("node %s failed to load", self.node_id)
        finally:
            self.loaded_event.set()

    def _place(self, cap: pb.Capacity, n_layers: int) -> Shard:
        """Report the capacity to the coordinator and wait for this part's layers (it answers once
        every part has reported); the coordinator may start after the nodes: retry until it answers."""
        req = pb.PlaceRequest(node_id=self.node_id, model_part=self.part, n_layers=n_layers, capacity=cap)
        log.info(
            "node %s measured %.2f ms per layer, memory limit %s (%s); asking the coordinator for its layers",
            self.node_id,
            cap.ms_per_layer,
            format_bytes(cap.limit_bytes),
            cap.limit_reason,
        )
        deadline = time.monotonic() + 600
        while True:
            try:
                with tls.sync_channel(
                    self.cfg, self.node_id, "coordinator", self.cfg.coordinator.address
                ) as ch:
                    resp = pb_grpc.CoordinatorStub(ch).Place(req, timeout=330)
                return Shard(resp.start_layer, resp.end_layer, n_layers)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                    raise ConfigError(f"node {self.node_id}: placement refused: {exc.details()}") from exc  # type: ignore[union-attr]
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def stop(self, grace: float = 1.0) -> None:
        set_serving(self.health, [SERVICE], False)
        if self.servicer.chain is not None:
            self.servicer.chain.stop()
        self.server.stop(grace).wait()
        if self.runner:
            self.runner.close()


def _join(coordinator: str, srv: NodeServer) -> None:
    with tls.sync_channel(srv.cfg, srv.node_id, "coordinator", coordinator) as ch:
        resp = pb_grpc.CoordinatorStub(ch).Join(
            pb.JoinRequest(
                node_id=srv.node_id,
                address=srv.address,
                model_part=srv.part,
                join_token=srv.cfg.coordinator.join_token or "",
            ),
            timeout=30,
        )
    if not resp.accepted:
        raise SystemExit(f"node {srv.node_id}: the coordinator refused the join: {resp.message}")
    log.debug("joined %s: %s", coordinator, resp.message)


def serve_node(
    cfg: Config,
    node_id: str,
    join: str | None = None,
    part: int | None = None,
    address: str | None = None,
    listen_address: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. With `join`, register with that coordinator once loaded and
    leave it (after it drained this node's requests) on shutdown."""
    srv = NodeServer(cfg, node_id, address=address, part=part, listen_address=listen_address)
    srv.start(background_load=False)
    if srv.error:
        srv.stop(0)
        why = str(srv.error)  # a budget or placement refusal already names the node
        raise SystemExit(why if why.startswith(f"node {node_id}:") else f"node {node_id}: {why}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if join:
        _join(join, srv)
        # Re-announce periodically: a restarted coordinator forgets joined nodes (Join is idempotent).
        while not stop.wait(5.0):
            try:
                _join(join, srv)
            except (grpc.RpcError, SystemExit) as exc:
                log.warning("re-joining %s failed: %s", join, exc)
    stop.wait()
    if join:
        try:
            with tls.sync_channel(cfg, node_id, "coordinator", join) as ch:
                left = pb_grpc.CoordinatorStub(ch).Leave(
                    pb.LeaveRequest(node_id=node_id, join_token=cfg.coordinator.join_token or ""),
                    timeout=cfg.api.request_timeout_s,
                )
            log.info("left %s after draining %d requests", join, left.drained_requests)
        except grpc.RpcError as exc:
            log.warning("could not leave %s cleanly: %s", join, exc)
    srv.stop(2.0)

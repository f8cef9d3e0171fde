"""StageRunner: a model node's plain-Python core (no gRPC), called by node_server.py and tests.

Owns one StageEngine, serialises forwards on it (one forward at a time; the native kernels use the
node's threads inside it), evicts idle caches after a TTL, and keeps the counters Info reports.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil

from pipeserve.modeling.engine import SeqChunk, StageEngine, StageOutput
from pipeserve.modeling.loader import LoadedStage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSnapshot:
    used_tokens: int  # positions of the blocks requests hold
    free_blocks: int
    cached_blocks: int  # full blocks known by hash
    hit_tokens: int
    lookup_tokens: int
    request_ids: tuple[str, ...]  # requests holding a cache
    resident_bytes: int  # k/v bytes of the blocks written (untouched pages cost nothing)


@dataclass
class RunnerStats:
    forwards_total: int = 0
    forward_ms_total: float = 0.0
    last_forward_ms: float = 0.0
    in_flight: int = 0


class StageRunner:
    def __init__(
        self,
        node_id: str,
        part: int,
        loaded: LoadedStage,
        cache_budget_tokens: int,
        cache_ttl_s: float,
        max_context: int | None = None,
        kv_dtype: str = "f32",
    ) -> None:
        self.node_id, self.part, self.loaded = node_id, part, loaded
        self.engine = StageEngine(loaded, cache_budget_tokens, max_context, kv_dtype=kv_dtype)
        self.cache_ttl_s = cache_ttl_s
        self.stats = RunnerStats()
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._snapshot()
        self._evictor = threading.Thread(target=self._evict_loop, name="cache-evictor", daemon=True)
        self._evictor.start()

    def forward(self, chunks: Sequence[SeqChunk], hidden: np.ndarray | None) -> StageOutput:
        with self._stats_lock:
            self.stats.in_flight += 1
        try:
            with self._lock:
                try:
                    out = self.engine.forward(chunks, hidden)
                finally:
                    self._snapshot()
        finally:
            with self._stats_lock:
                self.stats.in_flight -= 1
        with self._stats_lock:
            self.stats.forwards_total += 1
            self.stats.forward_ms_total += out.forward_ms
            self.stats.last_forward_ms = out.forward_ms
        return out

    def release(self, request_ids: list[str]) -> dict[str, int]:
        with self._lock:
            freed = self.engine.release(request_ids)
            self._snapshot()
            return freed

    def lookup_prefix(self, request_id: str, token_ids: list[int]) -> int:
        with self._lock:
            n = self.engine.lookup_prefix(request_id, token_ids)
            self._snapshot()
            return n

    def _snapshot(self) -> None:
        """Publish the cache's counters (under the lock; readers take the immutable snapshot, so
        Info never walks the cache while a forward changes it)."""
        c = self.engine.cache
        self._snap = CacheSnapshot(
            c.used_tokens,
            c.free_blocks,
            c.cached_blocks,
            c.hit_tokens,
            c.lookup_tokens,
            tuple(c.seqs),
            c.resident_bytes,
        )

    def cache_snapshot(self) -> CacheSnapshot:
        return self._snap

    @property
    def cache_used_tokens(self) -> int:
        return self._snap.used_tokens

    @property
    def active_requests(self) -> int:
        return len(self._snap.request_ids)

    @staticmethod
    def rss_bytes() -> int:
        return psutil.Process().memory_info().rss

    def _evict_loop(self) -> None:
        period = min(5.0, self.cache_ttl_s / 2)
        while not self._stop.wait(period):
            with self._lock:
                stale = self.engine.cache.evict_idle(self.cache_ttl_s)
                self._snapshot()
            if stale:
                log.warning(
                    "evicted %d idle caches after %.0f s: %s", len(stale), self.cache_ttl_s, stale[:5]
                )

    def close(self) -> None:
        self._stop.set()

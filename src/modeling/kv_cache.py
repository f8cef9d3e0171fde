"""Per-request KV caches of one pipeline stage, bounded by a token budget.

Owned by `StageEngine`: one `SeqCache` per request id, created by its first chunk (start_pos 0),
grown in blocks, freed on release, evicted after an idle TTL. The budget counts cached tokens over
all requests; going past it raises CacheBudgetError with the numbers instead of running out of RAM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeserve.common.errors import (
    CacheBudgetError,
    ContextLengthError,
    InvalidInputError,
    UnknownRequestError,
)

GROW_BLOCK = 128  # tokens added per reallocation; bounds the slack per request


@dataclass
class SeqCache:
    request_id: str
    k: torch.Tensor  # [L_local, n_kv, capacity, head_dim]
    v: torch.Tensor  # [L_local, n_kv, capacity, head_dim]
    length: int = 0  # tokens cached (positions 0..length-1)
    tokens: list[int] = field(default_factory=list)  # token ids seen, for sampling penalties
    last_used: float = field(default_factory=time.monotonic)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


class KVCachePool:
    def __init__(
        self, n_local_layers: int, n_kv_heads: int, head_dim: int, budget_tokens: int, max_context: int
    ) -> None:
        self.shape = (n_local_layers, n_kv_heads, head_dim)
        self.budget_tokens = budget_tokens
        self.max_context = max_context
        self.seqs: dict[str, SeqCache] = {}

    @property
    def used_tokens(self) -> int:
        return sum(s.length for s in self.seqs.values())

    @property
    def bytes_allocated(self) -> int:
        return sum(s.k.numel() * s.k.element_size() * 2 for s in self.seqs.values())

    def reserve(self, plan: list[tuple[str, int, int]]) -> list[SeqCache]:
        """Make room for a batch: plan = [(request_id, start_pos, n_tokens)] in batch order.

        Validates everything before changing anything, so a rejected batch leaves no trace.
        A chunk may start before the cached length (the tail is overwritten, e.g. a replay),
        never after it.
        """
        seen: set[str] = set()
        growth = 0
        for rid, start, n in plan:
            if rid in seen:
                raise InvalidInputError(f"request {rid!r} appears twice in one batch")
            seen.add(rid)
            if n <= 0:
                raise InvalidInputError(f"request {rid!r} has an empty chunk")
            if start + n > self.max_context:
                raise ContextLengthError(
                    f"request {rid!r}: positions up to {start + n} exceed the context length {self.max_context}"
                )
            cur = self.seqs.get(rid)
            have = cur.length if cur else 0
            if cur is None and start != 0:
                raise UnknownRequestError(
                    f"no cache for request {rid!r} on this stage (chunk starts at {start})"
                )
            if start > have:
                raise InvalidInputError(
                    f"request {rid!r}: positions out of order: chunk starts at {start} but {have} tokens are cached"
                )
            growth += start + n - have
        used = self.used_tokens
        if used + growth > self.budget_tokens:
            raise CacheBudgetError(
                f"KV cache budget exceeded: {used} tokens cached + {growth} new > budget {self.budget_tokens}"
            )
        out = []
        now = time.monotonic()
        for rid, start, n in plan:
            seq = self.seqs.get(rid)
            if seq is None:
                seq = self.seqs[rid] = self._alloc(rid, n)
            if start + n > seq.capacity:
                self._grow(seq, start + n)
            seq.length = start  # truncate on replay; extended by commit()
            del seq.tokens[start:]
            seq.last_used = now
            out.append(seq)
        return out

    def _alloc(self, rid: str, n: int) -> SeqCache:
        cap = min(self.max_context, _round_up(n, GROW_BLOCK))
        L, nkv, hd = self.shape
        return SeqCache(rid, torch.empty(L, nkv, cap, hd), torch.empty(L, nkv, cap, hd))

    def _grow(self, seq: SeqCache, need: int) -> None:
        cap = min(self.max_context, _round_up(max(need, seq.capacity + seq.capacity // 2), GROW_BLOCK))
        L, nkv, hd = self.shape
        k, v = torch.empty(L, nkv, cap, hd), torch.empty(L, nkv, cap, hd)
        k[:, :, : seq.length] = seq.k[:, :, : seq.length]
        v[:, :, : seq.length] = seq.v[:, :, : seq.length]
        seq.k, seq.v = k, v

    def release(self, request_ids: list[str]) -> dict[str, int]:
        """Free caches; returns request id -> tokens freed (0 for ids not held)."""
        return {rid: (s.length if (s := self.seqs.pop(rid, None)) else 0) for rid in request_ids}

    def evict_idle(self, ttl_s: float) -> list[str]:
        cutoff = time.monotonic() - ttl_s
        stale = [rid for rid, s in self.seqs.items() if s.last_used < cutoff]
        for rid in stale:
            del self.seqs[rid]
        return stale


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m

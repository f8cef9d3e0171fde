"""Paged KV caches of one pipeline stage: one preallocated pool of fixed-size blocks, shared prefixes.

Owned by `StageEngine`. The pool holds `n_blocks` blocks of `block_size` token positions for every
local layer (k, v: [n_blocks, layers, n_kv, block_size, row] numpy arrays of the kv_dtype over anonymous
memory maps, allocated once; pages the OS has not touched cost no memory; a row is head_dim elements,
or for q8_0 their ggml blocks: `kernels.kv_row_items`). A sequence (`SeqCache`, one per request id) owns a block table.
Prefix caching (vLLM-style): each *full* block gets the hash of its tokens chained with the previous
block's hash; a new request whose prompt starts with cached blocks takes them by reference (no
copy; `lookup_prefix`). Past the last whole block that matches, the prompt may still share the first
c < block_size tokens of a cached block (an identical prompt whose earlier answer filled the block it
ends in, or a chat that resends the previous turn): every full block is also findable by the keys of
its leading 1..bs-1 tokens, and such a match is copied into a block of the new request's own (it
will write the rest), so reuse goes to the token, as llama.cpp's server reuses a slot's prompt.
Blocks with no owner stay cached, in LRU order, until a new block is needed.
A block that is shared is never written: a sequence that rewrites positions inside it (a replay)
first gets its own copy.

Where a new block comes from, so that resident memory follows use: first a free block that holds
nothing cached (a block a replay or a rejected draft gave up), the most recently freed (its pages are
resident and warm); then a block never written (memory grows); only then the least recently used
cached block (its hash is forgotten). Free blocks unused for the cache TTL are forgotten and their
pages handed back to the OS (`forget_cold`), so an idle node's memory shrinks back.
The budget is the pool: asking for more blocks than are free raises CacheBudgetError with the
numbers (the coordinator preempts), and the counters say what is held, cached and hit.

Sliding windows (`window` W: every layer of the stage attends to its last W positions, Mistral-style):
a chunk starting at position n never reads keys before n - W + 1, nor does any later chunk (a
speculative rollback keeps at least the chunk's first token), so the blocks wholly before that are
given up when the chunk is reserved (`_slide`): a sequence holds at most ceil((W + chunk) / bs) + 1
blocks however long it grows. Those blocks keep their prefix hashes (freed, not forgotten), and the
block table keeps a HOLE in their place. A stage with any full-attention layer (Gemma 3's 1 global :
5 local) keeps every block: one table serves all of its layers.
"""

from __future__ import annotations

import mmap
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from pipeserve.common.errors import (
    CacheBudgetError,
    ContextLengthError,
    InvalidInputError,
    UnknownRequestError,
)
from pipeserve.common.kvblocks import BLOCK_SIZE, block_hash, partial_hashes
from pipeserve.kernels import KV_DTYPES, kv_row_bytes, kv_row_items


def kv_token_layer_bytes(n_kv_heads: int, head_dim: int, kv_dtype: str = "f32") -> int:
    """Bytes one token position takes in one layer of the pool: k and v (memory budgets)."""
    return 2 * n_kv_heads * kv_row_bytes(head_dim, kv_dtype)


HOLE = -1  # a block-table entry given up behind a sliding window (never read again)
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 (_lazy_zeros)


@dataclass
class SeqCache:
    request_id: str
    blocks: list[int] = field(default_factory=list)  # block table: position p is in blocks[p // block_size]
    holes: int = 0  # leading entries of `blocks` given up behind the window (HOLE)
    length: int = 0  # tokens cached (positions 0..length-1)
    tokens: list[int] = field(default_factory=list)  # token ids seen, for sampling penalties and hashes
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks, in order
    last_used: float = field(default_factory=time.monotonic)


class KVCachePool:
    def __init__(
        self,
        n_local_layers: int,
        n_kv_heads: int,
        head_dim: int,
        budget_tokens: int,
        max_context: int,
        block_size: int = BLOCK_SIZE,
        kv_dtype: str = "f32",
        window: int | None = None,
    ) -> None:
        row = kv_row_items(head_dim, kv_dtype)  # ValueError for an unknown type or a q8_0 misfit
        if window is not None and window < 1:
            raise ValueError(f"a sliding window must hold at least one position, got {window}")
        self.window = window  # every local layer's sliding window, or None (some layer sees all)
        self.kv_dtype = kv_dtype
        self.block_size = block_size
        self.n_blocks = max(1, -(-budget_tokens // block_size))
        self.budget_tokens = self.n_blocks * block_size
        self.max_context = max_context
        shape = (self.n_blocks, n_local_layers, n_kv_heads, block_size, row)
        # untouched pages are not resident: memory grows with use
        dtype = KV_DTYPES[kv_dtype][0]
        (self._k_map, self.k), (self._v_map, self.v) = _lazy_zeros(shape, dtype), _lazy_zeros(shape, dtype)
        self.block_bytes = self.k[0].nbytes  # of k, and as much of v
        self.refs = [0] * self.n_blocks
        self.hash_of: list[bytes | None] = [None] * self.n_blocks
        self.cached: dict[bytes, int] = {}  # full-block hash -> block holding it
        self.part: dict[bytes, int] = {}  # key of a cached block's first c < bs tokens -> the block
        self.part_keys: list[list[bytes]] = [[] for _ in range(self.n_blocks)]  # each block's keys in `part`
        # The free blocks, in three kinds (each block is in exactly one, or referenced):
        self.fresh: list[int] = list(range(self.n_blocks - 1, -1, -1))  # never written (pop: lowest)
        self.blank: OrderedDict[int, float] = OrderedDict()  # written, nothing cached -> time freed
        self.lru: OrderedDict[int, float] = OrderedDict()  # holding a cached block, LRU first
        self.seqs: dict[str, SeqCache] = {}
        self.hit_tokens = 0  # prompt tokens served from cached blocks (lookup_prefix)
        self.lookup_tokens = 0  # prompt tokens looked up

    # ------------------------------------------------------------------ counters

    @property
    def free_blocks(self) -> int:
        return len(self.fresh) + len(self.blank) + len(self.lru)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - self.free_blocks

    @property
    def resident_bytes(self) -> int:
        """k and v bytes of the blocks written since their pages were last handed back (what the
        pool costs in memory, to within one huge page per map: _lazy_zeros; never-written pages
        cost nothing)."""
        return (self.n_blocks - len(self.fresh)) * 2 * self.block_bytes

    @property
    def used_tokens(self) -> int:
        """Token positions of the blocks requests hold (the budget counts these)."""
        return self.used_blocks * self.block_size

    @property
    def cached_blocks(self) -> int:
        """Blocks whose contents are known by hash (held or free): reusable prefixes."""
        return len(self.cached)

    # ------------------------------------------------------------------ blocks

    def _take(self) -> int:
        """A free block: blank (most recently freed), else never written, else the least recently
        used cached one, whose prefix is forgotten."""
        if self.blank:
            b, _ = self.blank.popitem(last=True)
        elif self.fresh:
            b = self.fresh.pop()
        else:
            b, _ = self.lru.popitem(last=False)
            self._forget(b)
        self.refs[b] = 1
        return b

    def _forget(self, b: int) -> None:
        h = self.hash_of[b]
        if h is not None:
            del self.cached[h]
            self.hash_of[b] = None
        for key in self.part_keys[b]:
            if self.part.get(key) == b:
                del self.part[key]
        self.part_keys[b] = []

    def _ref(self, b: int) -> None:
        if self.refs[b] == 0:  # only cached blocks are found again, so a free one is in the LRU
            del self.lru[b]
        self.refs[b] += 1

    def _unref(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:  # most recently freed: evicted last
            (self.blank if self.hash_of[b] is None else self.lru)[b] = time.monotonic()

    def _drop(self, seq: SeqCache, keep: int) -> None:
        """Give up the sequence's blocks past the first `keep` (the tail first, so that under
        pressure a sequence's last blocks are reused before its shared prefix)."""
        for b in reversed(seq.blocks[keep:]):
            if b != HOLE:
                self._unref(b)
        del seq.blocks[keep:]
        seq.holes = min(seq.holes, keep)

    def _behind_window(self, seq: SeqCache, start: int) -> range:
        """Block-table entries not yet given up that lie wholly before the window of a chunk
        starting at `start` (start - W + 1): no query of it or of any later chunk reads them."""
        if not self.window:
            return range(0)
        upto = min(max(0, start - self.window + 1) // self.block_size, len(seq.blocks))
        return range(seq.holes, upto)

    def _slide(self, seq: SeqCache, start: int) -> None:
        """A chunk starts at `start`: give up the blocks behind its window; they stay cached by
        hash for other requests."""
        behind = self._behind_window(seq, start)
        for j in behind:
            self._unref(seq.blocks[j])
            seq.blocks[j] = HOLE
        seq.holes = max(seq.holes, behind.stop)

    # ------------------------------------------------------------------ prefix cache

    def lookup_prefix(self, rid: str, token_ids: list[int]) -> int:
        """Start request `rid` (afresh: a cache it holds is dropped first) on the longest run of
        cached full blocks its tokens begin with, then on a copy of the longest run of leading tokens
        of a cached block that the rest begins with (`_take_partial`); returns how many positions
        are cached (always below len(token_ids): the last token is computed so the stage has
        something to sample from)."""
        if rid in self.seqs:  # a recompute whose release has not arrived yet: start it afresh
            self.release([rid])
        bs = self.block_size
        seq = SeqCache(rid)
        prev = b""
        for j in range((len(token_ids) - 1) // bs):
            h = block_hash(prev, token_ids[j * bs : (j + 1) * bs])
            b = self.cached.get(h)
            if b is None:
                break
            self._ref(b)
            seq.blocks.append(b)
            seq.hashes.append(h)
            prev = h
        seq.length = len(seq.blocks) * bs + self._take_partial(seq, prev, token_ids)
        seq.tokens = list(token_ids[: seq.length])
        self.seqs[rid] = seq
        self.lookup_tokens += len(token_ids)
        self.hit_tokens += seq.length
        return seq.length

    def _take_partial(self, seq: SeqCache, prev: bytes, token_ids: list[int]) -> int:
        """Past seq's whole cached blocks (the last one's hash `prev`): copy the cached block whose
        first c tokens are the longest run the rest of token_ids begins with (c < block size, and
        at most len - 1 positions cached in all) into a new block of seq's own. Returns c (0: none,
        or no block free to copy into: a full pool shares whole blocks only)."""
        bs = self.block_size
        start = len(seq.blocks) * bs
        limit = min(bs - 1, len(token_ids) - 1 - start)
        if limit <= 0 or not self.part:
            return 0
        keys = partial_hashes(prev, token_ids[start : start + limit])
        for c in range(limit, 0, -1):
            b = self.part.get(keys[c - 1])
            if b is None:
                continue
            self._ref(b)  # held while a block is taken, so that taking one cannot evict it
            if not self.free_blocks:
                self._unref(b)
                return 0
            nb = self._take()
            self.k[nb] = self.k[b]
            self.v[nb] = self.v[b]
            self._unref(b)
            seq.blocks.append(nb)
            return c
        return 0

    def _register(self, seq: SeqCache, upto: int) -> None:
        """Hash the sequence's newly full blocks before position `upto` so that later requests can
        share them (drafts past it are not hashed until verified: a block holding them is never
        shared, so taking them back never copies)."""
        bs = self.block_size
        for j in range(len(seq.hashes), upto // bs):
            prev, toks = seq.hashes[-1] if seq.hashes else b"", seq.tokens[j * bs : (j + 1) * bs]
            h = block_hash(prev, toks)
            seq.hashes.append(h)
            b = seq.blocks[j]  # a HOLE when the window passed it before its drafts were verified
            if b != HOLE and h not in self.cached and self.hash_of[b] is None:
                self._publish(b, h, partial_hashes(prev, toks[: bs - 1]))

    def _publish(self, b: int, h: bytes, keys: list[bytes]) -> None:
        """Block b is cached under h, and found by `keys`, those of its leading tokens, by prompts
        that share only part of it (_take_partial; a key another block holds stays with it)."""
        self.cached[h] = b
        self.hash_of[b] = h
        for key in keys:
            if key not in self.part:
                self.part[key] = b
                self.part_keys[b].append(key)

    # ------------------------------------------------------------------ a batch

    def reserve(self, plan: list[tuple[str, int, int]]) -> list[SeqCache]:
        """Make room for a batch: plan = [(request_id, start_pos, n_tokens)] in batch order.

        Validates everything and counts the blocks needed before changing anything, so a
        rejected batch leaves no trace. A chunk may start before the cached length (the tail is
        rewritten, e.g. a replay), never after it.
        """
        bs = self.block_size
        seen: set[str] = set()
        need = 0
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
            if cur and cur.holes and self.window and start - self.window + 1 < cur.holes * bs:
                raise UnknownRequestError(  # a rewrite reaching back past what the window gave up
                    f"request {rid!r}: positions before {cur.holes * bs} were freed behind the sliding window "
                    f"of {self.window}; a chunk at {start} needs them (replay from position 0)"
                )
            kept = min(len(cur.blocks), -(-start // bs)) if cur else 0
            if cur:  # blocks _slide will give up (after any truncation to `kept`) before taking new ones
                behind = self._behind_window(cur, start)
                need -= sum(1 for j in behind if j < kept and self.refs[cur.blocks[j]] == 1)
            cow = 1 if cur and start % bs and kept and self.refs[cur.blocks[kept - 1]] > 1 else 0
            need += max(0, -(-(start + n) // bs) - kept) + cow
        if need > self.free_blocks:
            raise CacheBudgetError(
                f"KV cache full: the batch needs {need} more blocks of {bs} tokens but {self.free_blocks} of "
                f"{self.n_blocks} are free ({self.used_tokens} tokens held)"
            )
        out = []
        now = time.monotonic()
        for rid, start, n in plan:
            seq = self.seqs.get(rid)
            if seq is None:
                seq = self.seqs[rid] = SeqCache(rid)
            if start < seq.length:
                self._truncate(seq, start)
            self._slide(seq, start)
            while len(seq.blocks) * bs < start + n:
                seq.blocks.append(self._take())
            seq.last_used = now
            out.append(seq)
        return out

    def _truncate(self, seq: SeqCache, start: int) -> None:
        """Forget positions start.. of a sequence; a shared block it will write into is copied."""
        bs = self.block_size
        keep = -(-start // bs)
        self._drop(seq, keep)
        del seq.hashes[start // bs :]
        del seq.tokens[start:]
        seq.length = start
        if start % bs and keep:
            b = seq.blocks[keep - 1]  # the block that will be partly rewritten
            if self.refs[b] > 1:  # shared: copy on write
                nb = self._take()
                self.k[nb] = self.k[b]
                self.v[nb] = self.v[b]
                self._unref(b)
                seq.blocks[keep - 1] = nb
            else:  # ours alone; if published, its contents will change: forget its hash
                self._forget(b)

    def truncate(self, seq: SeqCache, length: int) -> None:
        """Forget positions length.. (rejected drafts): blocks past it are given up, the hashes of
        full blocks before it stay (their contents are unchanged)."""
        if length < seq.length:
            self._truncate(seq, length)

    def commit(self, seq: SeqCache, start: int, token_ids: list[int], n_draft: int = 0) -> None:
        """After a forward: positions start..start+len-1 hold these tokens' k/v (the last n_draft
        are unverified drafts)."""
        seq.length = start + len(token_ids)
        seq.tokens.extend(token_ids)
        self._register(seq, seq.length - n_draft)

    def release(self, request_ids: list[str]) -> dict[str, int]:
        """Free caches; returns request id -> tokens freed (0 for ids not held). Full blocks stay
        cached (by hash) for later requests until their space is needed, and so does a last,
        partly filled block (`_publish_tail`)."""
        out = {}
        for rid in request_ids:
            seq = self.seqs.pop(rid, None)
            out[rid] = seq.length if seq else 0
            if seq:
                self._publish_tail(seq)
                self._drop(seq, 0)
        return out

    def _publish_tail(self, seq: SeqCache) -> None:
        """A released sequence's partly filled last block, if it was its own, is cached too (by the
        key of its m tokens, and found by those of its leading 1..m): the next turn of a chat, or
        the same prompt again, resends them. It is only ever copied (_take_partial), never shared."""
        bs, n = self.block_size, seq.length
        m, full = n % bs, n // bs
        if not m or self.window or len(seq.hashes) != full or len(seq.blocks) <= full:
            return
        b = seq.blocks[full]
        if b == HOLE or self.refs[b] != 1 or self.hash_of[b] is not None:
            return
        keys = partial_hashes(seq.hashes[-1] if seq.hashes else b"", seq.tokens[full * bs : n])
        if keys[-1] not in self.cached:
            self._publish(b, keys[-1], keys)

    def evict_idle(self, ttl_s: float) -> list[str]:
        """Release the sequences idle for ttl_s, then forget the free blocks as old (`forget_cold`)."""
        cutoff = time.monotonic() - ttl_s
        stale = [rid for rid, s in self.seqs.items() if s.last_used < cutoff]
        self.release(stale)
        self.forget_cold(ttl_s)
        return stale

    def forget_cold(self, ttl_s: float) -> int:
        """Free blocks unused for ttl_s lose their cached prefix and their pages go back to the OS
        (they read as zeros when next written, as never-written ones do). Returns how many."""
        cutoff = time.monotonic() - ttl_s
        cold = []
        for kind in (self.blank, self.lru):  # both are in order of the time freed
            while kind and next(iter(kind.values())) < cutoff:
                b, _ = kind.popitem(last=False)
                self._forget(b)
                cold.append(b)
        for b in cold:
            for m in (self._k_map, self._v_map):
                _discard_pages(m, b * self.block_bytes, self.block_bytes)
        if cold:
            self.fresh.extend(cold)
            self.fresh.sort(reverse=True)  # the lowest block is taken first again
        return len(cold)

    def check(self) -> None:
        """Invariants (tests): every block is free xor referenced, refcounts equal the tables."""
        counts = [0] * self.n_blocks
        for s in self.seqs.values():
            assert all(b == HOLE for b in s.blocks[: s.holes]), "a hole past the window's edge"
            for b in s.blocks[s.holes :]:
                counts[b] += 1
        assert counts == self.refs, "refcounts differ from the block tables"
        kinds = [set(self.fresh), set(self.blank), set(self.lru)]
        assert sum(map(len, kinds)) == len(self.fresh) + len(self.blank) + len(self.lru), "a block twice"
        free = set().union(*kinds)
        assert all((self.refs[b] == 0) == (b in free) for b in range(self.n_blocks))
        assert all(self.hash_of[b] is None for b in kinds[0] | kinds[1]), "a fresh/blank block is cached"
        assert all(self.hash_of[b] is not None for b in kinds[2]), "an LRU block holds nothing"
        assert all(self.hash_of[b] == h for h, b in self.cached.items())
        assert all(key in self.part_keys[b] and self.hash_of[b] is not None for key, b in self.part.items())
        assert sum(map(len, self.part_keys)) == len(self.part), "a partial key held twice"


def _lazy_zeros(
    shape: tuple[int, ...], dtype: type[np.generic] = np.float32, huge: bool = True
) -> tuple[mmap.mmap, np.ndarray]:
    """An array over its own anonymous memory map (returned with it): zeros, and no page is
    resident before it is written. The map asks for transparent huge pages unless `huge` is False
    (benchmarks measure without them; the OS's common `madvise` mode grants them only on request):
    decode attention reads one K and one V block per layer and kv head from scattered blocks, a
    TLB miss each with 4 KiB pages; with huge pages an f32 step's attention took 3-8% less time on
    the Zen 4 VM at 4096 and 16384 positions, f16's and q8_0's about the same
    (bench/attention-zen4.json). Fresh blocks are taken lowest first (`fresh`), so the pages made resident ahead of use are at most one huge page
    (2 MiB) per map. Pages handed back (`forget_cold`) inside a huge page that live blocks still
    use may be filled again when the OS's khugepaged collapses that range: never beyond the pool's
    size, which the node's memory budget counts in full (common/memory.py)."""
    item = np.dtype(dtype).itemsize
    n = int(np.prod(shape)) * item
    buf = mmap.mmap(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE") and n >= HUGE_PAGE:
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf, np.frombuffer(buf, dtype=dtype, count=n // item).reshape(shape)


def _discard_pages(m: mmap.mmap, offset: int, n: int) -> None:
    """Hand the whole pages inside [offset, offset + n) of the map back to the OS: they read as
    zeros again (the pool's blocks need not be page-aligned; a partial page at either end stays)."""
    page = mmap.PAGESIZE
    lo = -(-offset // page) * page
    hi = (offset + n) // page * page
    if hi > lo and hasattr(m, "madvise"):  # not on every OS: memory then stays with the process
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

"""StageEngine: one pipeline stage's compute over a flat batch, with its KV caches and sampler.

The node server's StageRunner wraps this; tests drive it directly. `forward` takes chunks from
many sequences (prefill chunks and single decode tokens mixed), validates them, runs the stage's
layers once over the whole batch, and on the last stage samples one token per chunk that asks.

Speculative verification: a chunk whose last `n_draft` tokens are drafts (the coordinator guessed
them) gets n_draft + 1 positions sampled in the same forward. The last stage keeps the sampled
tokens while each equals the draft it follows, plus the first that does not (or the one after the
last draft): exactly the tokens one-at-a-time decoding gives, since a row's draw depends only on
its logits, its history and (seed, position). It then truncates its cache to the accepted
positions; earlier stages truncate when the next chunk starts there (`KVCachePool.reserve`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeserve.common.errors import InvalidInputError
from pipeserve.modeling.config import ModelConfig
from pipeserve.modeling.kv_cache import BLOCK_SIZE, KVCachePool
from pipeserve.modeling.layers import BatchMeta, SeqSlot
from pipeserve.modeling.loader import LoadedStage
from pipeserve.modeling.sampling import SamplingParams, sample


@dataclass
class SeqChunk:
    """One sequence's share of a batch: tokens at positions start_pos .. start_pos+len-1."""

    request_id: str
    start_pos: int
    token_ids: list[
        int
    ]  # every stage receives them: the first embeds them, the last keeps them for penalties
    sampling: SamplingParams | None = None  # last stage: sample the token that follows this chunk
    n_draft: int = 0  # the last n_draft tokens are drafts to verify (sampling set: n_draft + 1 rows)


@dataclass
class SampledToken:
    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StageOutput:
    hidden: np.ndarray | None  # [T, C] for the next stage; None on the last stage
    samples: list[SampledToken]  # last stage only, in batch order of the chunks that asked; a chunk
    # with drafts gets its accepted drafts' tokens and then the one after them, in order
    forward_ms: float
    logits: np.ndarray | None = None  # [S, V] last stage: logits of every sampled row (drafts: n_draft + 1)


def stage_window(cfg: ModelConfig, start: int, end: int) -> int | None:
    """The sliding window every layer in [start, end) has (their cache can forget what lies behind
    it: KVCachePool `window`), or None when some layer attends to the whole sequence."""
    windows = {cfg.window(layer) for layer in range(start, end)}
    return windows.pop() if len(windows) == 1 else None


class StageEngine:
    def __init__(
        self,
        loaded: LoadedStage,
        cache_budget_tokens: int = 32768,
        max_context: int | None = None,
        block_size: int = BLOCK_SIZE,
        kv_dtype: str = "f32",
    ) -> None:
        self.loaded = loaded
        cfg = loaded.cfg
        self.cfg, self.shard, self.model = cfg, loaded.shard, loaded.model
        self.max_context = min(max_context or cfg.max_position, cfg.max_position)
        self.cache = KVCachePool(
            self.shard.n_local,
            cfg.n_kv_heads,
            cfg.head_dim,
            cache_budget_tokens,
            self.max_context,
            block_size,
            kv_dtype,
            stage_window(cfg, self.shard.start_layer, self.shard.end_layer),
        )

    def forward(self, chunks: Sequence[SeqChunk], hidden: np.ndarray | None = None) -> StageOutput:
        t0 = time.perf_counter()
        x = self._validate(chunks, hidden)
        new_ids = [c.request_id for c in chunks if c.request_id not in self.cache.seqs]
        caches = self.cache.reserve([(c.request_id, c.start_pos, len(c.token_ids)) for c in chunks])
        slots, offset = [], 0
        sample_rows: list[int] = []
        for c, seq in zip(chunks, caches, strict=True):
            n = len(c.token_ids)
            slots.append(SeqSlot(offset, n, c.start_pos, seq, self.cache))
            if c.sampling is not None and self.shard.is_last:
                sample_rows.extend(range(offset + n - 1 - c.n_draft, offset + n))
            offset += n
        meta = BatchMeta.build(slots, sample_rows)
        try:
            out = self.model(x, meta)
        except BaseException:
            self.cache.release(new_ids)  # a failed batch leaves no half-made caches behind
            raise
        for c, seq in zip(chunks, caches, strict=True):
            self.cache.commit(seq, c.start_pos, c.token_ids, c.n_draft)
        if not self.shard.is_last:
            return StageOutput(out, [], (time.perf_counter() - t0) * 1e3)
        asking = [(c, seq) for c, seq in zip(chunks, caches, strict=True) if c.sampling is not None]
        samples: list[SampledToken] = []
        if asking:
            params, histories, positions = [], [], []
            for c, seq in asking:  # one row per sampled position: the chunk's last n_draft + 1
                for pos in range(seq.length - c.n_draft, seq.length + 1):
                    params.append(c.sampling)
                    # penalties read a draft row's history up to its position (a copy, only then)
                    short = pos < seq.length and c.sampling is not None and c.sampling.has_penalties
                    histories.append(seq.tokens[:pos] if short else seq.tokens)
                    positions.append(pos)
            res = sample(out, params, histories, positions)
            row = 0
            for c, seq in asking:
                for j in range(c.n_draft + 1):
                    tok = res.token_ids[row + j]
                    samples.append(
                        SampledToken(
                            c.request_id,
                            tok,
                            res.logprobs[row + j] if res.logprobs is not None else None,
                            res.top_logprobs[row + j] if res.top_logprobs is not None else [],
                        )
                    )
                    if j == c.n_draft or tok != c.token_ids[len(c.token_ids) - c.n_draft + j]:
                        # rejected from here on: forget the drafts' positions this stage cached
                        self.cache.truncate(seq, seq.length - c.n_draft + j)
                        break
                row += c.n_draft + 1
        return StageOutput(None, samples, (time.perf_counter() - t0) * 1e3, out)

    def _validate(self, chunks: Sequence[SeqChunk], hidden: np.ndarray | None) -> np.ndarray:
        if not chunks:
            raise InvalidInputError("empty batch: a forward needs at least one sequence")
        n_tokens = sum(len(c.token_ids) for c in chunks)
        for c in chunks:
            if c.start_pos < 0:
                raise InvalidInputError(f"request {c.request_id!r}: negative start position {c.start_pos}")
            if not 0 <= c.n_draft < len(c.token_ids):
                raise InvalidInputError(
                    f"request {c.request_id!r}: n_draft {c.n_draft} must be below the chunk's "
                    f"{len(c.token_ids)} tokens (the first token is not a draft)"
                )
            if c.sampling is not None:
                c.sampling.validate()
        if self.shard.is_first:
            ids = [t for c in chunks for t in c.token_ids]
            bad = next((t for t in ids if not 0 <= t < self.cfg.vocab_size), None)
            if bad is not None:
                raise InvalidInputError(
                    f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})"
                )
            return np.asarray(ids, dtype=np.int64)
        want = (n_tokens, self.cfg.hidden_size)
        if hidden is None:
            raise InvalidInputError(
                f"stage [{self.shard.start_layer}, {self.shard.end_layer}) needs hidden states {want}"
            )
        if not isinstance(hidden, np.ndarray) or hidden.dtype != np.float32 or tuple(hidden.shape) != want:
            got = (
                f"{hidden.dtype} {list(hidden.shape)}"
                if isinstance(hidden, np.ndarray)
                else type(hidden).__name__
            )
            raise InvalidInputError(f"hidden states must be float32 {list(want)}, got {got}")
        return hidden

    def release(self, request_ids: list[str]) -> dict[str, int]:
        return self.cache.release(request_ids)

    def lookup_prefix(self, request_id: str, token_ids: list[int]) -> int:
        """Start a request on the cached blocks its prompt begins with; returns the cached length."""
        return self.cache.lookup_prefix(request_id, token_ids)

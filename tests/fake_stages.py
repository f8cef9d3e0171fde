"""In-process fake pipeline stages, path and tokenizer for unit tests of the scheduler: plain
Python, no gRPC anywhere.

A `FakeStage` has the node client's methods (info, release, lookup_prefix, close) and `compute`,
one stage's forward, and keeps its caches in the real `KVCachePool` (tiny tensors: 1 layer, 1
head, head_dim 1), so block accounting, out-of-blocks, unknown requests and prefix sharing behave
exactly as on a node. `FakePath` is the scheduler's `StagePath` over them: a step goes down each
request's route part by part (as the chain takes it), a failure at a node ends its requests' step
with that error, naming part and node. The "model" is a toy whose answers depend on every earlier
token: stage s's hidden row for position p is [hash(tokens[:p+1]), p, s], each later stage checks
the rows it receives against its own cache (a path that routes hidden states wrongly makes it
fail), and the last stage's next token is a function of that hash. `reference(prompt, n)` is the
same toy run alone, for the equality checks. Failures are the domain errors a real node reports
(common/errors.py), so the scheduler's failover policy sees what it sees in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from pipeserve.common.errors import InvalidInputError, PipeserveError, StageUnavailableError
from pipeserve.common.tokenizer_client import DecodeItem, DecodeResult
from pipeserve.coordinator.cluster import NodeHandle
from pipeserve.coordinator.requests import PlanItem
from pipeserve.coordinator.stage_path import Outcome, Sampled, StageTime
from pipeserve.modeling.kv_cache import KVCachePool
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import tokenizer_service_pb2 as tpb

VOCAB = 64
EOS = 1
MOD = 1_000_003  # hashes stay exact in float32


def prefix_hash(tokens: list[int]) -> int:
    h = 7
    for t in tokens:
        h = (h * 131 + t + 1) % MOD
    return h


def next_token(tokens: list[int]) -> int:
    """The toy model's greedy choice after `tokens` (never EOS, never 0)."""
    return 2 + (prefix_hash(tokens) * 31 + len(tokens)) % (VOCAB - 2)


def reference(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(next_token(toks))
    return toks[len(prompt) :]


class FakeStage:
    def __init__(
        self,
        node_id: str,
        part: int,
        n_parts: int,
        layers_per_part: int = 2,
        budget_tokens: int = 4096,
        max_context: int = 1024,
        block_size: int = 16,
        window: int | None = None,
    ) -> None:
        self.node_id, self.part, self.n_parts = node_id, part, n_parts
        self.window = window  # as if every layer had this sliding window: the pool frees behind it
        self.layers = (part * layers_per_part, (part + 1) * layers_per_part, n_parts * layers_per_part)
        self.max_context = max_context
        self.pool = KVCachePool(1, 1, 1, budget_tokens, max_context, block_size, window=window)
        self.poison: set[int] = set()  # a chunk with one of these tokens fails (a bug: internal)
        self.down = False  # every call fails as if the process were gone
        self.delay_s = 0.0
        self.on_lookup: Callable[[str], None] | None = None  # runs as a LookupPrefix arrives (interleavings)
        self.forwards = 0
        self.max_batch = 0  # most sequences seen in one forward

    @property
    def is_last(self) -> bool:
        return self.part == self.n_parts - 1

    def _check_up(self) -> None:
        if self.down:
            raise StageUnavailableError(f"failed to connect to {self.node_id}", node=self.node_id)

    def restart(self) -> None:
        """The process restarted: every cache is gone."""
        self.pool = KVCachePool(
            1, 1, 1, self.pool.budget_tokens, self.max_context, self.pool.block_size, window=self.window
        )

    async def compute(
        self, chunks: list[tuple[str, int, list[int], bool, int]], hidden: np.ndarray | None
    ) -> tuple[np.ndarray | None, dict[str, list[int]]]:
        """One forward over chunks (request id, start, tokens, sample, n_draft): the hidden rows for
        the next stage (None on the last) and, on the last, the tokens of every chunk that asked:
        its next token, or with drafts the accepted ones and the one after (the last stage then
        forgets the rejected drafts' positions, as a node does)."""
        self._check_up()
        await asyncio.sleep(self.delay_s)
        self._check_up()
        self.forwards += 1
        self.max_batch = max(self.max_batch, len(chunks))
        if any(t in self.poison for _, _, toks, _, _ in chunks for t in toks):
            raise PipeserveError(f"{self.node_id}: kernel assertion failed")
        seqs = self.pool.reserve([(rid, start, len(toks)) for rid, start, toks, _, _ in chunks])
        rows, tokens = [], {}
        for (rid, start, new, sample, n_draft), seq in zip(chunks, seqs, strict=True):
            toks = seq.tokens[:start] + list(new)
            for p in range(start, start + len(new)):
                rows.append([float(prefix_hash(toks[: p + 1])), float(p), float(self.part)])
            if self.is_last and sample:
                out = []
                for j in range(n_draft + 1):  # verify: keep the next token while it equals the draft
                    out.append(next_token(toks[: len(toks) - n_draft + j]))
                    if j == n_draft or out[-1] != toks[len(toks) - n_draft + j]:
                        break
                tokens[rid] = out
        if self.part > 0:  # what the previous stage computed for exactly these positions
            want = np.array(rows, np.float32) - np.array([0.0, 0.0, 1.0], np.float32)
            if hidden is None or hidden.shape != want.shape or not np.array_equal(hidden, want):
                self.pool.release([rid for rid, _, _, _, _ in chunks])
                raise PipeserveError(f"{self.node_id}: hidden states do not match")
        for (rid, start, new, _, n_draft), seq in zip(chunks, seqs, strict=True):
            self.pool.commit(seq, start, list(new), n_draft)
            if rid in tokens:
                self.pool.truncate(seq, seq.length - n_draft + len(tokens[rid]) - 1)
        return (None if self.is_last else np.array(rows, np.float32)), tokens

    async def info(self, host_sharing: int = 0) -> pb.NodeInfo:
        self._check_up()
        return pb.NodeInfo(
            node_id=self.node_id,
            model_part=self.part,
            model_name="toy",
            model_checksum="toy",
            layers=pb.LayerRange(
                start_layer=self.layers[0], end_layer=self.layers[1], n_layers=self.layers[2]
            ),
            max_context=self.max_context,
            vocab_size=VOCAB,
            cache_budget_tokens=self.pool.budget_tokens,
            cache_used_tokens=self.pool.used_tokens,
            cache_block_size=self.pool.block_size,
            kv_window=self.window or 0,
            cache_blocks_total=self.pool.n_blocks,
            cache_blocks_free=self.pool.free_blocks,
            cached_request_ids=sorted(self.pool.seqs),
        )

    async def release(self, request_ids: list[str]) -> pb.ReleaseResponse:
        self._check_up()
        freed = self.pool.release(list(request_ids))
        return pb.ReleaseResponse(
            released=[pb.ReleasedCache(request_id=r, tokens_freed=n) for r, n in freed.items()],
            cache_used_tokens=self.pool.used_tokens,
        )

    async def lookup_prefix(self, request_id: str, token_ids: list[int]) -> int:
        self._check_up()
        if self.on_lookup is not None:
            self.on_lookup(request_id)
        return self.pool.lookup_prefix(request_id, list(token_ids))

    async def close(self) -> None:
        pass


class FakePath:
    """The scheduler's StagePath over FakeStages: each part in turn runs the chunks routed to each
    of its nodes (one batch per node, as the chain's messages are), passes the hidden rows on to
    the next part's node of each request, and the last part's tokens come back. A node that fails
    ends its requests' step with its error (part and node named); the others go on."""

    def __init__(self, stages: dict[str, FakeStage]) -> None:
        self.stages = stages

    async def run(self, plan: list[PlanItem], timeout_s: float) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        hidden: dict[str, np.ndarray] = {}
        timings: dict[str, list[StageTime]] = {r.id: [] for r, _, _ in plan}
        alive = list(plan)
        n_parts = len(plan[0][0].route) if plan else 0
        for part in range(n_parts):
            by_node: dict[NodeHandle, list[PlanItem]] = {}
            for item in alive:
                by_node.setdefault(item[0].route[part], []).append(item)
            alive = []
            for node, items in by_node.items():
                chunks = [
                    (r.id, s, r.tokens[s : s + n] + r.draft * last, last, len(r.draft) * last)
                    for r, s, n in items
                    for last in [int(s + n == len(r.tokens))]
                ]
                rows = np.concatenate([hidden[r.id] for r, _, _ in items]) if part > 0 else None
                try:
                    out, tokens = await asyncio.wait_for(
                        self.stages[node.id].compute(chunks, rows), timeout_s
                    )
                except PipeserveError as exc:
                    err = exc.fill(part=part, node=node.id)
                    for r, _, _ in items:
                        outcomes[r.id] = Outcome(False, node=node, part=part, error=err)
                    continue
                except TimeoutError:
                    continue  # no outcome: the scheduler's step timeout
                off = 0
                for item, (_, _, toks, _, _) in zip(items, chunks, strict=True):
                    r = item[0]
                    timings[r.id].append(StageTime(part, node.id, 0.1, 0.0, 0))
                    if out is not None:
                        hidden[r.id] = out[off : off + len(toks)]
                    off += len(toks)
                    if r.id in tokens:
                        outcomes[r.id] = Outcome(True, tokens=[Sampled(t) for t in tokens[r.id]])
                    alive.append(item)
        for r, _, _ in alive:
            outcomes.setdefault(r.id, Outcome(True))
            outcomes[r.id].timings = timings[r.id]
        return outcomes

    async def wait_live(self, nodes: Iterable[NodeHandle], timeout_s: float) -> bool:
        return True

    def ensure_streams(self) -> None:
        pass

    async def close(self) -> None:
        pass


def word(t: int) -> str:
    """The toy vocabulary: token t is the text "w<t> " (EOS is empty)."""
    return "" if t == EOS else f"w{t} "


class FakeTokenizer:
    address = "fake-tokenizer"

    def __init__(self) -> None:
        self.down = False
        self.bad_ids: set[int] = set()  # ids the in-process decoding cannot decode (per-item errors)

    async def info(self) -> tpb.TokenizerInfo:
        if self.down:
            raise StageUnavailableError("tokenizer is gone")
        return tpb.TokenizerInfo(
            model_name="toy", model_checksum="toy", vocab_size=VOCAB, eos_token_ids=[EOS]
        )

    async def decode_stream(self, items: list[DecodeItem]) -> list[DecodeResult]:
        if self.down:
            raise StageUnavailableError("tokenizer is gone")
        out = []
        for it in items:
            if bad := self.bad_ids & set(it.token_ids):
                err = InvalidInputError(f"token id {min(bad)} is outside the vocabulary [0, {VOCAB})")
                out.append(DecodeResult("", it.prefix_offset, it.read_offset, [], err))
                continue
            new = list(it.token_ids)[it.read_offset - it.prefix_offset :]
            end = it.prefix_offset + len(it.token_ids)
            pieces = [word(t) for t in new]
            if it.steps > 1:  # one piece per new token (what came before them in the first)
                pieces = [
                    "".join(pieces[: len(pieces) - it.steps + 1]),
                    *pieces[len(pieces) - it.steps + 1 :],
                ]
            else:
                pieces = ["".join(pieces)]
            out.append(DecodeResult("".join(pieces), end, end, pieces))
        return out

    async def close(self) -> None:
        pass


def fake_cluster_config(parts: int, replicas: dict[int, int] | None = None, **coordinator: Any) -> Any:
    """A Config naming fake nodes node1, node2, node2b ... (addresses are only keys here)."""
    from pipeserve.common.config import parse_config

    nodes = []
    for part in range(parts):
        for r in range((replicas or {}).get(part, 1)):
            nid = f"node{part + 1}" + ("" if r == 0 else chr(ord("a") + r))
            nodes.append({"id": nid, "address": f"fake-{nid}:1", "model_part": part})
    return parse_config(
        {
            "model_name": "toy",
            "nodes": nodes,
            "coordinator": {
                "recovery_wait_s": 2.0,
                "health_interval_s": 0.05,
                **coordinator,
            },
            "tokenizer": {"address": "fake-tokenizer:1"},
        }
    )

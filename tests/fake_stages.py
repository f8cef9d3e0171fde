"""In-process fake pipeline stages and tokenizer for unit tests of the scheduler (no gRPC server).

A `FakeStage` has the node client's methods (forward, info, release, lookup_prefix, close) and
keeps its caches in the real `KVCachePool` (tiny tensors: 1 layer, 1 head, head_dim 1), so block
accounting, out-of-blocks, unknown requests and prefix sharing behave exactly as on a node. The
"model" is a toy whose answers depend on every earlier token: stage s's hidden row for position p
is [hash(tokens[:p+1]), p, s], each later stage checks the rows it receives against its own
cache (a coordinator that routes hidden states wrongly makes it fail), and the last stage's next
token is a function of that hash. `reference(prompt, n)` is the same toy run alone, for the
equality checks. Failures are raised as the gRPC errors a real node's servicer sends (rich
status details included), so the scheduler's failover policy sees what it sees in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from pipeserve.common import codec
from pipeserve.common.errors import PipeserveError
from pipeserve.common.grpc_util import rich_status
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


def rpc_error(code: grpc.StatusCode, text: str, exc: PipeserveError | None = None) -> grpc.aio.AioRpcError:
    """The exception a gRPC client raises for a failed call (with our status details for `exc`)."""
    trailing = grpc.aio.Metadata()
    if exc is not None:  # as the servicer's interceptor sends it: code and text from the status
        status = rich_status(exc)
        code, text = status.code, status.details
        trailing = grpc.aio.Metadata(*status.trailing_metadata)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=text)


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
    ) -> None:
        self.node_id, self.part, self.n_parts = node_id, part, n_parts
        self.layers = (part * layers_per_part, (part + 1) * layers_per_part, n_parts * layers_per_part)
        self.max_context = max_context
        self.pool = KVCachePool(1, 1, 1, budget_tokens, max_context, block_size)
        self.poison: set[int] = set()  # a chunk with one of these tokens fails with INTERNAL
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
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"failed to connect to {self.node_id}")

    def restart(self) -> None:
        """The process restarted: every cache is gone."""
        self.pool = KVCachePool(1, 1, 1, self.pool.budget_tokens, self.max_context, self.pool.block_size)

    async def forward(self, msg: pb.ForwardRequest) -> pb.ForwardResponse:
        self._check_up()
        await asyncio.sleep(self.delay_s)
        self._check_up()
        self.forwards += 1
        self.max_batch = max(self.max_batch, len(msg.chunks))
        if any(t in self.poison for c in msg.chunks for t in c.token_ids):
            raise rpc_error(grpc.StatusCode.INTERNAL, f"{self.node_id}: kernel assertion failed")
        plan = [(c.request_id, c.start_pos, len(c.token_ids)) for c in msg.chunks]
        try:
            seqs = self.pool.reserve(plan)
        except PipeserveError as exc:
            raise rpc_error(grpc.StatusCode.UNKNOWN, exc.message, exc) from None
        rows, tokens = [], []
        for c, seq in zip(msg.chunks, seqs, strict=True):
            toks = seq.tokens[: c.start_pos] + list(c.token_ids)
            for p in range(c.start_pos, c.start_pos + len(c.token_ids)):
                rows.append([float(prefix_hash(toks[: p + 1])), float(p), float(self.part)])
            if self.is_last and c.sample:
                tokens.append(pb.SampledToken(request_id=c.request_id, token_id=next_token(toks)))
        if self.part > 0:  # what the previous stage computed for exactly these positions
            got = codec.decode_tensor(msg.hidden)
            want = np.array(rows, np.float32) - np.array([0.0, 0.0, 1.0], np.float32)
            if got.shape != want.shape or not np.array_equal(got, want):
                self.pool.release([c.request_id for c in msg.chunks])
                raise rpc_error(grpc.StatusCode.INTERNAL, f"{self.node_id}: hidden states do not match")
        for c, seq in zip(msg.chunks, seqs, strict=True):
            self.pool.commit(seq, c.start_pos, list(c.token_ids))
        hidden = None if self.is_last else codec.encode_tensor(np.array(rows, np.float32))
        return pb.ForwardResponse(
            hidden=hidden, tokens=tokens, forward_ms=0.1, cache_used_tokens=self.pool.used_tokens
        )

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


def word(t: int) -> str:
    """The toy vocabulary: token t is the text "w<t> " (EOS is empty)."""
    return "" if t == EOS else f"w{t} "


class FakeTokenizer:
    address = "fake-tokenizer"

    def __init__(self) -> None:
        self.down = False

    async def info(self) -> tpb.TokenizerInfo:
        if self.down:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "tokenizer is gone")
        return tpb.TokenizerInfo(
            model_name="toy", model_checksum="toy", vocab_size=VOCAB, eos_token_ids=[EOS]
        )

    async def decode_stream(self, items: list[tpb.DecodeStreamItem]) -> list[tpb.DecodeStreamResult]:
        if self.down:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "tokenizer is gone")
        out = []
        for it in items:
            new = list(it.token_ids)[it.read_offset - it.prefix_offset :]
            end = it.prefix_offset + len(it.token_ids)
            out.append(
                tpb.DecodeStreamResult(
                    request_id=it.request_id, text="".join(map(word, new)), prefix_offset=end, read_offset=end
                )
            )
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
                "data_path": "hub",
                **coordinator,
            },
            "tokenizer": {"address": "fake-tokenizer:1"},
        }
    )

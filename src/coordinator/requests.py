"""What the scheduler keeps per request and per micro-batch group, and the events a request's
stream receives. Plain data: the policies live in admission / planner / output / failover."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeserve.common.errors import PipeserveError
from pipeserve.common.sampling_params import SamplingParams
from pipeserve.coordinator.drafts import Acceptance, NgramDrafts

if TYPE_CHECKING:
    from pipeserve.coordinator.cluster import NodeHandle


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    logprobs: list[tuple[int, float]] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class FinalEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    text: str  # held-back text flushed at the end


@dataclass
class ErrorEvent:
    error: PipeserveError


@dataclass
class StageStats:
    node_id: str = ""
    forward_ms: float = 0.0
    hop_ms: float = 0.0
    bytes_sent: int = 0


@dataclass
class SpecStats:
    """Speculative decoding's counts, per request and summed over all of them."""

    drafted: int = 0  # drafts sent to be verified
    accepted: int = 0  # drafts the model agreed with
    passes: int = 0  # steps that gave it tokens
    tokens: int = 0  # tokens those steps gave

    def add(self, drafted: int, accepted: int, tokens: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.passes += 1
        self.tokens += tokens


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stop_ids: set[int]
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    n_computed: int = 0  # tokens whose KV is cached on every stage of the route
    route: dict[int, NodeHandle] = field(default_factory=dict)
    visited: set[NodeHandle] = field(default_factory=set)  # every node that may hold a cache for it
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    group: int = -1
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    stopping: bool = False  # its last token ends it (EOS or length); the emit task finishes it
    in_step: bool = False  # a forward for it is in flight: releasing its caches must wait for the step
    release_after_step: list[NodeHandle] = field(default_factory=list)
    failovers: int = 0
    preemptions: int = 0  # times its caches were taken back for others (it recomputes them)
    needs_lookup: bool = True  # its next prefill may start on cached prefix blocks (LookupPrefix)
    cached_tokens: int = 0  # prompt positions the prefix cache supplied on every stage
    suspect: bool = False  # it was in a batch a node failed with INTERNAL: it runs alone until cleared
    cache_wait_since: float | None = None  # a stage had no block for it and nobody to preempt
    stalled_since: float | None = None
    stage_stats: dict[int, StageStats] = field(default_factory=dict)
    # speculative decoding (drafts.py): its draft source, this step's drafts, its acceptance
    drafts: NgramDrafts | None = None  # None: it never drafts
    draft: list[int] = field(default_factory=list)  # sent after its next token in the current step
    # the first token proposed but not sent this step (-1: none): compared with the token that
    # comes out after the drafts sent (if all are accepted), so acceptance keeps being measured
    # while a request drafts less than it proposes, or nothing
    shadow: int = -1
    draft_reserve: int = 0  # KV positions its drafts may need beyond the next token (admission)
    acceptance: Acceptance = field(default_factory=Acceptance)
    spec: SpecStats = field(default_factory=SpecStats)
    # incremental detokenization state (offsets into the generated ids) and stop-string hold-back
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    emitted: int = 0

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt_ids) :]

    @property
    def reserve_tokens(self) -> int:
        """KV positions it needs on each stage for its next step (what admission counts)."""
        return len(self.tokens) + 1 + self.draft_reserve


@dataclass
class Group:
    """A micro-batch: its requests step through the pipeline together, one stage at a time."""

    index: int
    requests: list[Request] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    emitting: asyncio.Task | None = None  # detokenize + stream of the previous step, overlapping this one


# One step's share of a request: (request, first position, number of tokens).
PlanItem = tuple[Request, int, int]

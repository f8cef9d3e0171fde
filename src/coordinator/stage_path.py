"""What the scheduler needs from the way a step reaches the stages, in domain types.

The scheduler hands a `StagePath` a plan (each request's tokens start..start+n, on the route of
nodes it chose) and gets back one `Outcome` per request: the sampled token when the step went
through every part, or the error that stopped it (a `PipeserveError` whose reason says what
happened, naming part and node). Every wire message lives behind it: the chain (chain.py) in
production, plain Python in the scheduler's unit tests (tests/fake_stages.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pipeserve.common.errors import PipeserveError

if TYPE_CHECKING:
    from pipeserve.coordinator.cluster import NodeHandle
    from pipeserve.coordinator.requests import PlanItem


@dataclass
class Sampled:
    """The token the last stage sampled after a request's chunk, with its logprobs if asked."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StageTime:
    """One part's share of a step: its node, compute time, hop time and bytes received."""

    part: int
    node_id: str
    forward_ms: float
    hop_ms: float
    bytes_sent: int


@dataclass
class Outcome:
    """A request's result of one step: ok (with the sampled tokens when the chunk asked for them),
    or the error and the part (and node, when known) where it happened."""

    ok: bool
    tokens: list[Sampled] = field(default_factory=list)  # drafts: the accepted ones, then the next
    timings: list[StageTime] = field(default_factory=list)
    node: NodeHandle | None = None
    part: int = 0
    error: PipeserveError | None = None


class StagePath(Protocol):
    async def run(self, plan: list[PlanItem], timeout_s: float) -> dict[str, Outcome]:
        """Run one step; requests with no outcome by `timeout_s` are missing from the result."""
        ...

    async def wait_live(self, nodes: Iterable[NodeHandle], timeout_s: float) -> bool:
        """Until every node can take part in a step (False when `timeout_s` passed first)."""
        ...

    def ensure_streams(self) -> None:
        """After a health check: connect to nodes that became healthy."""
        ...

    async def close(self) -> None: ...

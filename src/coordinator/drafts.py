"""Speculative decoding's coordinator side: where drafts come from and how many a step carries.

A step that decodes a stream may carry, after the stream's next token, up to `max_draft` guessed
tokens; every stage computes them in the same forward (like a short prefill chunk) and the last
stage keeps the longest run the model agrees with, plus its own next token (engine.py). The output
is exactly what one-token steps give; what speculation changes is how many tokens one pass
through the pipeline yields, so the hops and per-step costs are shared by several tokens.

- `DraftSource` is where guesses come from. `NgramDrafts` is prompt lookup: the stream's last
  n tokens (n = NGRAM_MAX down to NGRAM_MIN) are looked up where they last occurred earlier in
  its prompt and output, and the tokens that followed there are proposed (code edits, quotes and
  structured output repeat long runs). A small draft model with the same vocabulary would be
  another source.
- `Acceptance` is a request's measured rate: each draft accepted while the ones before it were,
  as a decayed count, so a stream whose guesses stop matching soon stops paying for them.
- `StepCost` is the measured wall time of a step by its number of rows (1..MAX_ROWS), relative
  to a one-row step: on a compute-bound node extra rows cost nearly their full share, across
  slow links nearly nothing.
- `allocate` decides each decode's drafts for one step: it adds one draft at a time where the
  expected tokens gained per cost added is best, while that raises the step's expected tokens
  per unit of time, and never past MAX_ROWS rows in the step (so batches of many streams, which
  are compute-bound, do not draft, and every row is computed exactly as alone: config.MAX_DRAFT).

Plain Python, no I/O: tests/test_drafts.py drives it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeserve.common.config import MAX_DRAFT

MAX_ROWS = MAX_DRAFT + 1  # rows a step may have in all for any of its requests to draft
NGRAM_MAX = 4
NGRAM_MIN = 2
PRIOR_ROW_COST = 0.25  # a row's cost relative to a one-row step until steps are measured (optimistic: drafting is tried, then measured)
DECAY = 0.8  # weight of a request's past passes in its acceptance (per pass)


class DraftSource(Protocol):
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `tokens` (the request's prompt and output so far)."""
        ...


class NgramDrafts:
    """Prompt lookup over one request's tokens, indexed as they grow: for each n-gram size, the
    last position where each n-gram ended (entries for every position but the last, so that the
    stream's own suffix is never its match). Memory: NGRAM_MAX - NGRAM_MIN + 1 entries per token
    of the request, bounded by its context."""

    def __init__(self) -> None:
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # positions 0..indexed-1 are in `ends`

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        if k <= 0 or len(tokens) < NGRAM_MIN + 1:
            return []
        for end in range(self.indexed, len(tokens) - 1):  # index up to the second-to-last token
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end + 1 >= n:
                    self.ends[tuple(tokens[end + 1 - n : end + 1])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in range(min(NGRAM_MAX, len(tokens) - 1), NGRAM_MIN - 1, -1):
            at = self.ends.get(tuple(tokens[len(tokens) - n :]))
            if at is not None:
                return list(tokens[at + 1 : at + 1 + k])
        return []


@dataclass
class Acceptance:
    """A request's per-draft acceptance: each draft is accepted with probability `rate` if the one
    before it was (decayed counts of accepted drafts and of first rejections)."""

    accepted: float = 1.5  # a prior of 60%: a new stream tries its first matches
    rejected: float = 1.0

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (1 if accepted < drafted else 0)


@dataclass
class StepCost:
    """Measured wall time of steps by their number of rows (exponential moving averages), and
    the estimate for sizes not measured: between two measured sizes, on the line through them;
    beyond them, along the slope of the two nearest (the prior's shape, scaled to the one point
    measured, when there is only one; the prior alone when there is none)."""

    ms: dict[int, float] = field(default_factory=dict)
    alpha: float = 0.2

    def add(self, rows: int, ms: float) -> None:
        if 1 <= rows <= MAX_ROWS:
            old = self.ms.get(rows)
            self.ms[rows] = ms if old is None else (1 - self.alpha) * old + self.alpha * ms

    def estimate(self, rows: int) -> float:
        if rows in self.ms:
            return self.ms[rows]
        known = sorted(self.ms)
        if not known:
            return 1.0 + PRIOR_ROW_COST * (rows - 1)
        if len(known) == 1:
            m = known[0]
            return self.ms[m] * (1.0 + PRIOR_ROW_COST * (rows - 1)) / (1.0 + PRIOR_ROW_COST * (m - 1))
        below = [r for r in known if r < rows]
        above = [r for r in known if r > rows]
        if below and above:
            a, b = below[-1], above[0]
        elif below:
            a, b = below[-2], below[-1]
        else:
            a, b = above[0], above[1]
        slope = max(0.0, (self.ms[b] - self.ms[a]) / (b - a))
        return max(1e-9, self.ms[a] + slope * (rows - a))

    def ratio(self, rows: int) -> float:
        """Cost of a step of `rows` rows relative to a one-row step."""
        return self.estimate(rows) / self.estimate(1)


@dataclass
class Candidate:
    """A decode in this step that may draft: its proposal (already capped) and acceptance rate."""

    proposal: list[int]
    rate: float
    k: int = 0


def allocate(candidates: Sequence[Candidate], rows: int, cost: StepCost, decodes: int) -> int:
    """Set each candidate's k (drafts it sends) for a step that has `rows` rows without drafts, of
    which `decodes` produce a token each; returns the rows with drafts. Drafts are added one at a
    time, each to the candidate whose next draft is most likely accepted (rate^(k+1) under the
    geometric model), up to MAX_ROWS rows; of those prefixes the one with the most expected
    tokens per unit of step cost is kept (fewer drafts on a tie)."""
    tokens = float(decodes)
    order: list[Candidate] = []
    best_n, best = 0, tokens / cost.ratio(rows) if decodes else 0.0
    n_rows = rows
    while n_rows < MAX_ROWS:
        pick = None
        for c in candidates:
            if c.k < len(c.proposal) and (pick is None or c.rate ** (c.k + 1) > pick.rate ** (pick.k + 1)):
                pick = c
        if pick is None:
            break
        tokens += pick.rate ** (pick.k + 1)
        pick.k += 1
        order.append(pick)
        n_rows += 1
        value = tokens / cost.ratio(n_rows)
        if value > best * (1 + 1e-9):
            best_n, best = len(order), value
    for c in order[best_n:]:  # undo the drafts past the best prefix
        c.k -= 1
    return rows + best_n

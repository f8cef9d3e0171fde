"""`layers: auto`: split a model's layers over the parts by what their nodes measured and may hold.

Each node reports, before it loads anything, its memory limit, the model's weight bytes per layer
and at the ends (from the file's header), the KV pool bytes per layer it will at least allocate,
its runtime allowance, and how long one layer takes to run a small batch (ms). A part's range
must fit under the limit of every node serving it (replicas get the same split, so the smallest
counts). Within the budgets, parts get layers in proportion to speed (1 / ms per layer, the
slowest replica's), at least one each; when that does not fit, the split that makes the slowest
part fastest within the budgets. When no split fits, the error names the shortfall and the
smallest change that fixes it (a larger limit on one part's nodes, or one more node).

With `balance="memory"` (the coordinator's choice when one micro-batch group is in flight, as on
one host: the stages take turns, so the total time per step is the same for every split) the
split is the one whose tightest part has the most memory left per layer for its KV pool (what
`cache_budget_tokens: auto` sizes the pool from): the most KV positions the cluster can hold.
Speeds measured by nodes that share a host's cores at the same moment are noise there anyway.
Pure arithmetic: the coordinator runs it once every part has reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from pipeserve.common.errors import ConfigError
from pipeserve.common.memory import RUNTIME_BASE_BYTES, ModelWeights, format_bytes
from pipeserve.common.shard import Shard


@dataclass(frozen=True)
class Capacity:
    node_id: str
    part: int
    limit_bytes: int  # the node's memory limit (memory_limit: config, cgroup or machine)
    weights: ModelWeights  # the model's weight bytes per layer and at the ends
    ms_per_layer: float
    kv_layer_bytes: int = 0  # KV pool bytes per layer the node allocates at least
    runtime_bytes: int = RUNTIME_BASE_BYTES

    def need(self, start: int, end: int) -> int:
        """Bytes this node needs to serve layers [start, end)."""
        return self.runtime_bytes + self.weights.stage(start, end) + (end - start) * self.kv_layer_bytes


@dataclass(frozen=True)
class _Part:
    nodes: tuple[Capacity, ...]  # the part's replicas that reported

    def fits(self, start: int, end: int) -> bool:
        return all(c.need(start, end) <= c.limit_bytes for c in self.nodes)

    @property
    def ms(self) -> float:
        return max(max(c.ms_per_layer for c in self.nodes), 1e-6)

    def room(self, start: int, end: int) -> float:
        """Bytes per layer left under the tightest replica's limit with layers [start, end)."""
        return min(c.limit_bytes - c.need(start, end) for c in self.nodes) / (end - start)

    def names(self) -> str:
        return "/".join(c.node_id for c in self.nodes)


def split_layers(
    n_layers: int, caps: Sequence[Capacity], balance: Literal["speed", "memory"] = "speed"
) -> list[Shard]:
    """The layers of every part, in part order (caps: one or more per part). `balance`:
    speed (layers in proportion to speed within the budgets) or memory (the most KV room on the
    tightest part; for stages that take turns)."""
    n_parts = 1 + max((c.part for c in caps), default=-1)
    parts = [_Part(tuple(c for c in caps if c.part == p)) for p in range(n_parts)]
    missing = [p for p, part in enumerate(parts) if not part.nodes]
    if missing or not parts:
        raise ConfigError(
            f"placement needs a capacity for every part 0..{n_parts - 1}, got parts {sorted({c.part for c in caps})}"
        )
    if n_parts > n_layers:
        raise ConfigError(f"{n_parts} parts cannot split a model of {n_layers} layers")
    bad = next((c for c in caps if len(c.weights.layers) != n_layers), None)
    if bad is not None:
        raise ConfigError(
            f"node {bad.node_id} reported a model of {len(bad.weights.layers)} layers, not {n_layers}"
        )
    if balance == "memory":
        roomiest = _roomiest(n_layers, parts)
        if roomiest is None:
            raise ConfigError(_shortfall(n_layers, parts))
        return _shards(n_layers, roomiest)
    speed = [1.0 / p.ms for p in parts]
    want = [n_layers * s / sum(speed) for s in speed]
    ranges = _ranges(_proportional(n_layers, want))
    if all(p.fits(s, e) for p, (s, e) in zip(parts, ranges, strict=True)):
        return _shards(n_layers, ranges)
    fitted = _fastest_within(n_layers, parts)
    if fitted is None:
        raise ConfigError(_shortfall(n_layers, parts))
    return _shards(n_layers, fitted)


def _shards(n_layers: int, ranges: list[tuple[int, int]]) -> list[Shard]:
    return [Shard(s, e, n_layers) for s, e in ranges]


def _proportional(n_layers: int, want: list[float]) -> list[int]:
    """Whole counts near `want` (summing to n_layers), at least one each."""
    n = len(want)
    counts = [max(1, int(w)) for w in want]
    while sum(counts) < n_layers:  # to the parts furthest below their share
        counts[max(range(n), key=lambda i: want[i] - counts[i])] += 1
    while sum(counts) > n_layers:
        counts[max((i for i in range(n) if counts[i] > 1), key=lambda i: counts[i] - want[i])] -= 1
    return counts


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def _greedy(n_layers: int, parts: Sequence[_Part], cap: Callable[[int], int]) -> list[tuple[int, int]] | None:
    """Each part in order takes as many layers as fit its nodes (and at most cap(i)), leaving one
    for every part after it; the last takes the rest. This covers the most layers any split can
    (a part's need grows with its range), so it fails only when no split fits: None then."""
    out, start = [], 0
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        hi = n_layers if last else n_layers - (len(parts) - 1 - i)
        if last:
            if hi - start > cap(i) or not part.fits(start, hi):
                return None
            end = hi
        else:
            end = start
            while end < min(hi, start + cap(i)) and part.fits(start, end + 1):
                end += 1
            if end == start:
                return None
        out.append((start, end))
        start = end
    return out


def _fastest_within(n_layers: int, parts: Sequence[_Part]) -> list[tuple[int, int]] | None:
    """The split within the budgets whose slowest part (layers x ms per layer) is fastest: the
    smallest time T at which the greedy split with at most T / ms layers per part covers the model."""
    if _greedy(n_layers, parts, lambda i: n_layers) is None:
        return None
    times = sorted({k * p.ms for p in parts for k in range(1, n_layers + 1)})

    def within(t: float) -> list[tuple[int, int]] | None:
        return _greedy(n_layers, parts, lambda i: int(t / parts[i].ms + 1e-9))

    # the largest time lets every part take any count, so it fits
    return within(times[_smallest(0, len(times) - 1, lambda k: within(times[k]) is not None)])


def _roomiest(n_layers: int, parts: Sequence[_Part]) -> list[tuple[int, int]] | None:
    """The split within the budgets that maximizes the smallest `room` (bytes per layer left) over
    the parts, by dynamic programming over (part, first layer); None when no split fits."""
    n = len(parts)
    # best[i][s]: the largest smallest-room of parts i.. when part i starts at layer s; nxt: its end
    best = [[-math.inf] * (n_layers + 1) for _ in range(n + 1)]
    nxt = [[0] * (n_layers + 1) for _ in range(n)]
    best[n][n_layers] = math.inf
    for i in reversed(range(n)):
        last_end = n_layers - (n - 1 - i)  # every later part keeps at least one layer
        for s in range(i, last_end):
            for e in range(n_layers if i == n - 1 else s + 1, last_end + 1):
                if best[i + 1][e] == -math.inf or not parts[i].fits(s, e):
                    continue
                v = min(parts[i].room(s, e), best[i + 1][e])
                if v > best[i][s]:
                    best[i][s], nxt[i][s] = v, e
    if best[0][0] == -math.inf:
        return None
    out, s = [], 0
    for i in range(n):
        out.append((s, nxt[i][s]))
        s = nxt[i][s]
    return out


def _shortfall(n_layers: int, parts: Sequence[_Part]) -> str:
    """Why no split fits, and the smallest change that makes one: the error's text."""
    n = len(parts)
    for i, part in enumerate(parts):  # a part too small for even one layer, wherever it goes
        if n == 1:
            break
        starts = [0] if i == 0 else [n_layers - 1] if i == n - 1 else range(i, n_layers - (n - 1 - i))
        if not any(part.fits(s, s + 1) for s in starts):
            s = min(starts, key=lambda s: max(c.need(s, s + 1) - c.limit_bytes for c in part.nodes))
            c = max(part.nodes, key=lambda c: c.need(s, s + 1) - c.limit_bytes)
            need = c.need(s, s + 1)
            return (
                f"node {c.node_id} (part {i}) cannot hold even one layer of the model: layer {s} needs "
                f"{format_bytes(need)} there (weights {format_bytes(c.weights.stage(s, s + 1))} + KV "
                f"{format_bytes(c.kv_layer_bytes)} + runtime {format_bytes(c.runtime_bytes)}), its limit is "
                f"{format_bytes(c.limit_bytes)}: raise its memory_limit to at least {format_bytes(need, up=True)}, "
                "or leave it out"
            )
    held, start = [], 0  # what the budgets hold: each part in order takes all it can from where
    for i, part in enumerate(parts):  # the one before ends (the last: with the head, from the end)
        last = i == n - 1
        k = 0
        while start + k < n_layers and _holds(part, i == 0, last, start, k + 1, n_layers):
            k += 1
        held.append(k)
        start += k
    where = ", ".join(
        f"{p.names()}: {k} in {format_bytes(min(c.limit_bytes for c in p.nodes))}"
        for p, k in zip(parts, held, strict=True)
    )
    covered = sum(held)
    raises = [r for i in range(n) if (r := _raise_part(n_layers, parts, i)) is not None]
    fixes, more = [], []
    if raises:
        extra, limit, nodes = min(raises, key=lambda r: r[0])
        names = " and ".join(f"{c.node_id}'s" for c in nodes)
        fixes.append(f"raise {names} memory_limit to {format_bytes(limit, up=True)}")
        more.append(extra)
    added = _add_part(n_layers, parts)
    if added is not None:
        fixes.append(
            f"add a node with memory_limit >= {format_bytes(added[0], up=True)} as a new part {added[1]}"
            + (" (the parts from it on move up one)" if added[1] < n else "")
        )
        more.append(added[0])
    short = f", {format_bytes(min(more), up=True)} more memory at the least" if more else ""
    return (
        f"the nodes' memory budgets cannot hold the model's {n_layers} layers: they hold {covered} ({where}), "
        f"{n_layers - covered} layers short{short}; smallest fixes: {', or '.join(fixes) or 'larger limits'}"
    )


def _holds(part: _Part, first: bool, last: bool, start: int, k: int, n_layers: int) -> bool:
    """Whether the part's nodes hold k layers from `start` (the last part: the last k layers)
    with the ends its place gives it."""
    lo = n_layers - k if last else start
    return all(
        c.runtime_bytes
        + c.weights.extra(first, last)
        + sum(c.weights.layers[lo : lo + k])
        + k * c.kv_layer_bytes
        <= c.limit_bytes
        for c in part.nodes
    )


def _smallest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The smallest value in [lo, hi] for which ok (monotone) holds; hi when none below it does."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _upper(parts: Sequence[_Part]) -> int:
    """A limit under which any node holds the whole model."""
    return max(c.need(0, len(c.weights.layers)) for p in parts for c in p.nodes)


def _raise_part(n_layers: int, parts: Sequence[_Part], i: int) -> tuple[int, int, list[Capacity]] | None:
    """(bytes added, the new limit, the nodes raised) of the smallest limit for part i's nodes that
    makes a split fit (its nodes below that limit are raised to it); None when none does."""

    def with_limit(b: int) -> list[_Part]:
        new = tuple(c if c.limit_bytes >= b else _replace_limit(c, b) for c in parts[i].nodes)
        return [*parts[:i], _Part(new), *parts[i + 1 :]]

    def ok(b: int) -> bool:
        return _greedy(n_layers, with_limit(b), lambda _: n_layers) is not None

    hi = _upper(parts)
    if not ok(hi):
        return None
    b = _smallest(min(c.limit_bytes for c in parts[i].nodes), hi, ok)
    raised = [c for c in parts[i].nodes if c.limit_bytes < b]
    return sum(b - c.limit_bytes for c in raised), b, raised


def _add_part(n_layers: int, parts: Sequence[_Part]) -> tuple[int, int] | None:
    """(limit, position) of the smallest node that, added as a new part at that position, makes a
    split fit (None when none does); it is taken to plan like the nodes that reported (the
    largest KV plan and runtime allowance among them)."""
    if len(parts) + 1 > n_layers:
        return None
    like = max((c for p in parts for c in p.nodes), key=lambda c: (c.kv_layer_bytes, c.runtime_bytes))
    hi = _upper(parts)
    best: tuple[int, int] | None = None
    for k in range(len(parts) + 1):

        def ok(b: int, k: int = k) -> bool:
            new = _Part((replace(like, node_id="new", part=k, limit_bytes=b),))
            return _greedy(n_layers, [*parts[:k], new, *parts[k:]], lambda _: n_layers) is not None

        if ok(hi):
            b = _smallest(0, hi, ok)
            if best is None or b < best[0]:
                best = (b, k)
    return best


def _replace_limit(c: Capacity, limit: int) -> Capacity:
    return replace(c, limit_bytes=limit)

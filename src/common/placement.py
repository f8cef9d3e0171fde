"""`layers: auto`: split a model's layers over the parts by what their nodes measured.

Each part's node reports, before it loads its layers, its free memory, the bytes one layer takes
and how long one layer takes to run a small batch (ms). A part gets layers in proportion to its
speed (1 / ms per layer), at least one, and never more than its free memory holds (keeping
`reserve` of it for the KV cache and the runtime); the rest goes to the parts with room, fastest
first. Pure arithmetic: the coordinator runs it once every part has reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeserve.common.errors import ConfigError


@dataclass(frozen=True)
class Capacity:
    node_id: str
    part: int
    free_bytes: int
    layer_bytes: int
    ms_per_layer: float

    def max_layers(self, reserve: float) -> int:
        usable = self.free_bytes * (1.0 - reserve)
        return int(usable // max(1, self.layer_bytes))


def split_layers(n_layers: int, caps: list[Capacity], reserve: float = 0.5) -> list[tuple[int, int]]:
    """Half-open layer ranges, one per part in part order (caps: one per part)."""
    caps = sorted(caps, key=lambda c: c.part)
    n = len(caps)
    if [c.part for c in caps] != list(range(n)):
        raise ConfigError(
            f"placement needs one capacity per part 0..{n - 1}, got parts {[c.part for c in caps]}"
        )
    if n > n_layers:
        raise ConfigError(f"{n} parts cannot split a model of {n_layers} layers")
    room = [c.max_layers(reserve) for c in caps]
    if any(r < 1 for r in room) or sum(room) < n_layers:
        short = ", ".join(f"{c.node_id}: room for {r}" for c, r in zip(caps, room, strict=True))
        raise ConfigError(
            f"the nodes' free memory cannot hold the model's {n_layers} layers ({short} layers)"
        )
    speed = [1.0 / max(c.ms_per_layer, 1e-6) for c in caps]
    total = sum(speed)
    want = [n_layers * s / total for s in speed]
    counts = [max(1, min(room[i], int(want[i]))) for i in range(n)]
    # hand out what rounding and the memory caps left, to the parts furthest below their share
    while sum(counts) < n_layers:
        i = max((i for i in range(n) if counts[i] < room[i]), key=lambda i: want[i] - counts[i])
        counts[i] += 1
    while sum(counts) > n_layers:
        i = max((i for i in range(n) if counts[i] > 1), key=lambda i: counts[i] - want[i])
        counts[i] -= 1
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out

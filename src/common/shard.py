"""The layer range a pipeline stage serves: the one type for it in every package (config,
placement, the coordinator's cluster view, nodes, the engine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """A pipeline stage: layers [start_layer, end_layer) of a model with n_layers layers.

    The first stage (start_layer == 0) owns the token embedding; the last (end_layer == n_layers)
    owns the final norm and the LM head.
    """

    start_layer: int
    end_layer: int
    n_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.end_layer <= self.n_layers:
            raise ValueError(
                f"layer range [{self.start_layer}, {self.end_layer}) is not a non-empty range "
                f"inside the model's {self.n_layers} layers"
            )

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.n_layers

    @property
    def n_local(self) -> int:
        return self.end_layer - self.start_layer

    @property
    def range(self) -> tuple[int, int]:
        """(start_layer, end_layer): the half-open range, as config files and JSON write it."""
        return self.start_layer, self.end_layer

    def __str__(self) -> str:
        return f"[{self.start_layer}, {self.end_layer})"

    @staticmethod
    def even(n_layers: int, n_parts: int, part: int) -> Shard:
        """Part `part` of an even split; earlier parts take the remainder layers."""
        if n_parts > n_layers:
            raise ValueError(
                f"a {n_layers}-layer model cannot be split into {n_parts} parts (fewer layers than parts)"
            )
        if not 0 <= part < n_parts:
            raise ValueError(f"part {part} of {n_parts} does not exist for a {n_layers}-layer model")
        base, extra = divmod(n_layers, n_parts)
        start = part * base + min(part, extra)
        return Shard(start, start + base + (1 if part < extra else 0), n_layers)

    @staticmethod
    def full(n_layers: int) -> Shard:
        return Shard(0, n_layers, n_layers)

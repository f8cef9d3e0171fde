"""The engine computes on numpy arrays, the references (transformers) on torch tensors: the
tests compare the two through these wrappers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeserve.modeling import generate
from pipeserve.modeling.engine import SeqChunk, StageEngine


def run_stages(engines: Sequence[StageEngine], chunks: list[SeqChunk]) -> torch.Tensor:
    """`generate.run_stages` (the last stage's logits [S, V]) as a torch tensor."""
    return torch.from_numpy(generate.run_stages(engines, chunks))

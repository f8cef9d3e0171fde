"""Single-process generation over a list of stage engines (the whole pipeline in one process).

The reference the distributed cluster is tested against, and the engine benchmark's subject.
Batched like the coordinator: prefill every prompt in one forward, then one decode step per token
for all running sequences together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def run_stages(engines: Sequence[StageEngine], chunks: list[SeqChunk]) -> np.ndarray:
    """One forward through every stage; returns the last stage's logits [S, V]."""
    hidden = None
    for eng in engines:
        out = eng.forward(chunks, hidden)
        hidden = out.hidden
    assert out.logits is not None
    return out.logits


def generate(
    engines: Sequence[StageEngine],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    stop_ids: Sequence[int] = (),
    prefix: str = "gen",
) -> list[list[int]]:
    """Generate for a batch of prompts; each stops at a stop id (kept) or max_new_tokens."""
    rids = [f"{prefix}-{i}" for i in range(len(prompts))]
    outs: list[list[int]] = [[] for _ in prompts]
    chunks = [SeqChunk(r, 0, list(p), params) for r, p in zip(rids, prompts, strict=True)]
    pos = {r: len(p) for r, p in zip(rids, prompts, strict=True)}
    try:
        while chunks:
            hidden = None
            for eng in engines:
                out = eng.forward(chunks, hidden)
                hidden = out.hidden
            nxt = []
            for c, s in zip(chunks, out.samples, strict=True):
                i = rids.index(c.request_id)
                outs[i].append(s.token_id)
                if s.token_id in stop_ids or len(outs[i]) >= max_new_tokens:
                    continue
                nxt.append(SeqChunk(c.request_id, pos[c.request_id], [s.token_id], params))
                pos[c.request_id] += 1
            chunks = nxt
    finally:
        for eng in engines:
            eng.release(rids)
    return outs

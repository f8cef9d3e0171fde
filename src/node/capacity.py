"""What a node measures before it loads its layers, for `layers: auto` (common/placement.py).

It loads one layer of the model (a middle one when there is one), times a forward of 8 tokens on
it (the median of 5 after a warm-up, with the node's kernel threads), and reads the machine's
available memory. That one layer is dropped again before the real load.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import psutil

from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.loader import load_stage
from pipeserve.modeling.source import ModelSource, release_file_caches
from pipeserve.proto import model_service_pb2 as pb


def measure(source: ModelSource, n_layers: int, reps: int = 5) -> pb.Capacity:
    k = 1 if n_layers > 2 else 0
    stage = load_stage(source, (k, k + 1))
    engine = StageEngine(stage, cache_budget_tokens=256)
    x = (
        None
        if stage.shard.is_first
        else np.random.default_rng(0).standard_normal((8, stage.cfg.hidden_size), np.float32)
    )
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        engine.forward([SeqChunk(f"measure-{i}", 0, list(range(1, 9)))], x)
        times.append((time.perf_counter() - t0) * 1e3)
        engine.release([f"measure-{i}"])
    cap = pb.Capacity(
        free_bytes=psutil.virtual_memory().available,
        layer_bytes=stage.param_bytes,
        ms_per_layer=statistics.median(times[1:]),
    )
    del engine, stage
    release_file_caches()
    return cap

"""The hot path's copies before and after issue 25, in one run (`python scripts/bench_step_copies.py`).

Before: a later stage decoded float32 hidden states into a copy of its own (then the model copied
them again into its residual stream), every stage read each chunk's sampling parameters, and the
coordinator built each request's wire sampling message at every step. After: a read-only view of
the message's bytes (one copy, the model's), sampling read on the last stage only, the wire
message made once per request. Both are run in the same process on the same 3-node in-process
cluster (loopback gRPC, the chain), alternating, by swapping the three functions back; each round
is a single greedy stream: a long prompt's prefill (TTFT) and 64 decode steps (ms per token, and
the stages' own forward time per token). Writes bench/step-copies.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import numpy as np

from pipeserve.common import wire
from pipeserve.coordinator import chain as coordinator_chain
from pipeserve.node import codec
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.harness import start_cluster

NEW = (codec.decode_tensor, codec.chunks_from_pb, coordinator_chain._sampling_pb)


def old_decode_tensor(msg: pb.Tensor) -> np.ndarray:
    """Before: float32 rows copied into an array of the node's own."""
    if msg.dtype == pb.DTYPE_FLOAT32:
        return np.frombuffer(msg.data, dtype="<f4").astype(np.float32).reshape(tuple(msg.shape))
    return NEW[0](msg)


def old_chunks_from_pb(chunks, last=True):  # type: ignore[no-untyped-def]
    """Before: every stage read the sampling parameters."""
    return NEW[1](chunks, True)


def use(old: bool) -> None:
    codec.decode_tensor = old_decode_tensor if old else NEW[0]  # type: ignore[assignment]
    codec.chunks_from_pb = old_chunks_from_pb if old else NEW[1]  # type: ignore[assignment]
    coordinator_chain._sampling_pb = wire.sampling_to_pb if old else NEW[2]  # type: ignore[assignment]


def stream(stub: pb_grpc.CoordinatorStub, prompt: list[int], n: int) -> tuple[float, float, float]:
    """(TTFT ms, ms per decode token, the stages' forward ms per decode token) of one stream."""
    req = pb.GenerateRequest(
        prompt_token_ids=prompt,
        max_tokens=n,
        sampling=pb.SamplingParams(temperature=0, top_k=40, top_p=0.9),  # sampling fields on the wire
        ignore_eos=True,
    )
    t0 = time.perf_counter()
    first = None
    msgs = []
    for m in stub.Generate(req, timeout=600):
        if first is None and m.token_ids:
            first = time.perf_counter()
        msgs.append(m)
    end = time.perf_counter()
    assert first is not None
    final = msgs[-1]
    decode_ms = (end - first) * 1e3 / (n - 1)
    forward = sum(t.forward_ms for t in final.stage_timings)  # every step, the prefill's included
    return (first - t0) * 1e3, decode_ms, forward / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/step-copies.json"))
    args = ap.parse_args()
    c = start_cluster(args.model, 3, coordinator={"prefix_cache": False})
    rng = np.random.default_rng(0)
    rows: dict[str, list[tuple[float, float, float]]] = {"before": [], "after": []}
    try:
        with grpc.insecure_channel(c.cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            stream(stub, rng.integers(100, 20000, args.prompt_tokens).tolist(), 8)  # warm-up
            for r in range(args.rounds):
                for mode in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    use(mode == "before")
                    prompt = rng.integers(100, 20000, args.prompt_tokens).tolist()
                    rows[mode].append(stream(stub, prompt, args.tokens))
                    print(mode, [round(x, 2) for x in rows[mode][-1]], flush=True)
    finally:
        use(False)
        c.stop()
    out = {
        "command": f"python scripts/bench_step_copies.py --model {args.model}",
        "model": args.model,
        "nodes": 3,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.tokens,
        "rounds": args.rounds,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for mode, rs in rows.items():
        out[mode] = {
            "ttft_ms_median": statistics.median(r[0] for r in rs),
            "decode_ms_per_token_median": statistics.median(r[1] for r in rs),
            "stage_forward_ms_per_token_median": statistics.median(r[2] for r in rs),
            "rounds": [list(r) for r in rs],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({m: {k: v for k, v in out[m].items() if k != "rounds"} for m in rows}, indent=1))


if __name__ == "__main__":
    main()

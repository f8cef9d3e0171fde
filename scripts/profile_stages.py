"""Where a single stream's time per token goes, 1 node vs 3 nodes (`python scripts/profile_stages.py`).

Starts a process cluster of the embedded model on loopback (1 part, then 3 parts; 1 kernel thread
per node, the default data path), streams 64 greedy tokens once to warm up and once measured, and
prints ms per token with the coordinator's per-stage timings: compute on each node and RPC
overhead (hop) per token.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import grpc

from pipeserve.launcher.procs import ProcessCluster
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.harness import cluster_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    n = args.tokens
    for parts in (1, 3):
        cfg = cluster_config("smollm2-135m-instruct", parts)
        with tempfile.TemporaryDirectory() as tmp:
            pc = ProcessCluster(cfg, pathlib.Path(tmp)).start()
            try:
                with grpc.insecure_channel(cfg.coordinator.address) as ch:
                    stub = pb_grpc.CoordinatorStub(ch)
                    req = pb.GenerateRequest(
                        prompt_token_ids=[1, 2364, 314, 253],
                        max_tokens=n,
                        sampling=pb.SamplingParams(temperature=0),
                        ignore_eos=True,
                    )
                    list(stub.Generate(req, timeout=120))
                    t0 = time.perf_counter()
                    msgs = list(stub.Generate(req, timeout=120))
                    wall = time.perf_counter() - t0
            finally:
                pc.stop()
        final = msgs[-1]
        stages = ", ".join(
            f"part {t.part}: compute {t.forward_ms / n:.2f} + hop {t.hop_ms / n:.2f}"
            for t in final.stage_timings
        )
        print(f"{parts} part(s): {wall * 1e3 / n:.2f} ms per token ({stages} ms per token)")


if __name__ == "__main__":
    main()

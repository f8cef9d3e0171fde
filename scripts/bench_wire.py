"""What `wire_dtype` costs and saves (`make bench-wire`).

For each wire dtype (fp32, fp16, bf16) a 3-node in-process cluster of the embedded model generates
greedy completions of chat prompts through the coordinator; the fp32 run is the reference (it
equals a single process token for token). Reported per dtype: prompts whose whole completion
equals fp32's, mean tokens generated before the first difference, and the hidden-state bytes sent
per generated token to the stages after the first (from the coordinator's per-stage counters).
Writes bench/wire.json and prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 50.",
    "What does a compiler do?",
    "Give me a name for a grey cat.",
    "How many legs does a spider have?",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Translate 'good morning' into French.",
    "What is 17 times 23?",
    "Describe a rainbow to a child.",
]


def run(dtype: str, prompts: list[list[int]], n: int) -> dict[str, Any]:
    from pipeserve.proto import model_service_pb2 as pb
    from pipeserve.proto import model_service_pb2_grpc as pb_grpc
    from tests.harness import start_cluster

    c = start_cluster("smollm2-135m-instruct", 3, wire_dtype=dtype)
    outs, sent = [], 0
    try:
        with grpc.insecure_channel(c.cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            for ids in prompts:
                req = pb.GenerateRequest(
                    prompt_token_ids=ids,
                    max_tokens=n,
                    sampling=pb.SamplingParams(temperature=0),
                    ignore_eos=True,
                )
                msgs = list(stub.Generate(req, timeout=300))
                outs.append([t for m in msgs for t in m.token_ids])
                sent += sum(s.bytes_sent for s in msgs[-1].stage_timings if s.part > 0)
    finally:
        c.stop()
    return {"outputs": outs, "bytes_to_later_stages": sent, "tokens": sum(map(len, outs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("bench/wire.json"))
    args = ap.parse_args()
    from pipeserve.tokenizer.core import TokenizerCore

    tok = TokenizerCore.from_model("smollm2-135m-instruct")
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in QUESTIONS
    ]
    runs = {d: run(d, prompts, args.tokens) for d in ("fp32", "fp16", "bf16")}
    ref = runs["fp32"]["outputs"]
    rows = []
    for d, r in runs.items():
        same = [o == g for o, g in zip(r["outputs"], ref, strict=True)]
        first_diff = [
            next((i for i, (a, b) in enumerate(zip(o, g, strict=True)) if a != b), len(g))
            for o, g in zip(r["outputs"], ref, strict=True)
        ]
        rows.append(
            {
                "wire_dtype": d,
                "prompts": len(prompts),
                "tokens_per_prompt": args.tokens,
                "identical_completions": sum(same),
                "mean_tokens_before_first_difference": sum(first_diff) / len(first_diff),
                "token_agreement": sum(
                    a == b for o, g in zip(r["outputs"], ref, strict=True) for a, b in zip(o, g, strict=True)
                )
                / r["tokens"],
                "bytes_per_token_to_later_stages": r["bytes_to_later_stages"] / r["tokens"],
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "command": "make bench-wire"}, indent=1))
    print(
        "| wire_dtype | identical completions | mean tokens before the first difference | bytes per token to stages 2-3 (incl. prefill) |"
    )
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['wire_dtype']} | {r['identical_completions']} / {r['prompts']} | "
            f"{r['mean_tokens_before_first_difference']:.1f} of {r['tokens_per_prompt']} | "
            f"{r['bytes_per_token_to_later_stages']:.0f} |"
        )


if __name__ == "__main__":
    main()

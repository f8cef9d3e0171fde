"""A model at 8k positions (issue 27): a tiny random Llama with a long rope window, its logits after
an 8100-token prompt against transformers (fp32) within 1e-4, and greedy decoding through 3 nodes
equal to transformers' token for token. Splits of the decode attention (512 positions) and the
prefill tiles all take part at this length."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, run_stages
from pipeserve.modeling.loader import load_stage
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.conftest import make_tiny_checkpoint
from tests.harness import start_cluster

PROMPT_LEN, NEW = 8100, 6


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        "llama",
        tmp_path_factory.mktemp("long-llama"),
        seed=27,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )


@pytest.fixture(scope="module")
def reference(long_llama: Path) -> tuple[list[int], np.ndarray, list[int]]:
    """The prompt, transformers' last-position logits, and its greedy continuation."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(long_llama, dtype=torch.float32).eval()
    prompt = np.random.default_rng(8).integers(3, 320, PROMPT_LEN).tolist()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = model(ids).logits[0, -1].numpy()
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    return prompt, logits, out[0, PROMPT_LEN:].tolist()


def test_logits_at_8k_positions_equal_transformers(long_llama, reference):
    prompt, want, _ = reference
    eng = StageEngine(load_stage(str(long_llama)), cache_budget_tokens=8192)
    for s in range(0, PROMPT_LEN - 256, 256):  # the coordinator's chunks
        run_stages([eng], [SeqChunk("long", s, prompt[s : s + 256], GREEDY)])
    s = (PROMPT_LEN - 1) // 256 * 256
    got = run_stages([eng], [SeqChunk("long", s, prompt[s:], GREEDY)])[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()


def test_greedy_through_three_nodes_at_8k_equals_transformers(long_llama, reference):
    prompt, _, want = reference
    c = start_cluster(str(long_llama), parts=3)
    try:
        with grpc.insecure_channel(c.cfg.coordinator.address) as ch:
            req = pb.GenerateRequest(
                max_tokens=NEW, sampling=pb.SamplingParams(temperature=0), ignore_eos=True
            )
            req.prompt_token_ids.extend(prompt)
            got = [t for m in pb_grpc.CoordinatorStub(ch).Generate(req, timeout=300) for t in m.token_ids]
        assert got == want
    finally:
        c.stop()

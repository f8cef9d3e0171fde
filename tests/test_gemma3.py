"""Gemma 3 270M (the named model `gemma3-270m`, Q4_K_M GGUF) through a real 3-node cluster.

Greedy completions of raw prompts equal transformers' on the same GGUF (dequantized to fp32),
token for token; each node holds its slice in block form (Q5_0, Q4_K, Q6_K, Q8_0 kernels).
"""

from __future__ import annotations

import grpc
import pytest
import torch

from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.conftest import GEMMA
from tests.harness import start_cluster

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def cluster(gemma_path):
    c = start_cluster(GEMMA, parts=3)
    yield c
    c.stop()


def test_gemma3_cluster_greedy_equals_transformers(cluster, gemma_reference, gemma_hf_tokenizer):
    for prompt in PROMPTS:
        req = pb.GenerateRequest(
            prompt=prompt, max_tokens=32, sampling=pb.SamplingParams(temperature=0), ignore_eos=True
        )
        with grpc.insecure_channel(cluster.cfg.coordinator.address) as ch:
            msgs = list(pb_grpc.CoordinatorStub(ch).Generate(req, timeout=300))
        got = [t for m in msgs for t in m.token_ids]
        ids = gemma_hf_tokenizer(prompt).input_ids  # BOS + the prompt, as the GGUF asks
        assert msgs[-1].prompt_tokens == len(ids)
        with torch.inference_mode():
            out = gemma_reference.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32
            )[0, len(ids) :].tolist()
        assert got == out, (prompt, gemma_hf_tokenizer.decode(got), gemma_hf_tokenizer.decode(out))
        assert [r.node_id for r in msgs[-1].route] == ["node1", "node2", "node3"]


def test_gemma3_nodes_hold_blocks_not_fp32(cluster, gemma_path):
    from pipeserve.common.model_files import open_gguf

    types = {t.name: t.tensor_type.name for t in open_gguf(gemma_path).tensors}
    assert {"Q5_0", "Q4_K", "Q6_K", "Q8_0"} <= set(types.values())
    file_bytes = gemma_path.stat().st_size
    held = sum(n.runner.loaded.param_bytes for n in cluster.nodes)
    # the tied head is the embedding's own Q8_0 blocks on the last node: the file's bytes + one
    # embedding copy (first and last nodes), never an fp32 copy (4 x 268M params = 1 GB)
    assert held <= 1.05 * (
        file_bytes + sum(t.n_bytes for t in open_gguf(gemma_path).tensors if t.name == "token_embd.weight")
    )


def test_gemma3_without_chat_template_serves_completions_and_refuses_chat(cluster):
    """Gemma 3 270M's GGUF has no chat template: /v1/completions works through the API, and a chat
    request is a 400 with reason model_refused naming `messages`, not a guessed template."""
    import httpx

    from tests.test_api import ApiServer

    with ApiServer(cluster.cfg) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        ok = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 4
        chat = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        )
        assert chat.status_code == 400, chat.text
        err = chat.json()["error"]
        assert (err["code"], err["param"]) == ("model_refused", "messages"), err
        assert "chat template" in err["message"], err

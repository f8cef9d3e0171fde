"""Qwen2.5-Coder-1.5B-Instruct (the named model `qwen2.5-coder-1.5b-instruct`, Q4_K_M GGUF) through
a real 3-node cluster.

Greedy completions of two raw prompts and one chat (the GGUF's ChatML template) equal transformers'
on the same GGUF (dequantized to fp32), token for token; each node holds its slice in block form
(Q4_K, Q6_K). The reference (~7 GB) is loaded once, generates, and is freed before the cluster starts.
"""

from __future__ import annotations

import gc
from pathlib import Path

import grpc
import pytest
import torch

from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from pipeserve.proto import tokenizer_service_pb2 as tpb
from tests.harness import start_cluster

QWEN = "qwen2.5-coder-1.5b-instruct"
NEW_TOKENS = 32
RAW = ["def quicksort(arr):", "The three laws of thermodynamics are"]
CHAT = [{"role": "user", "content": "Write a Python function that checks whether a string is a palindrome."}]


@pytest.fixture(scope="module")
def qwen_path() -> Path:
    """The named model's GGUF (`make models` assembles it; `make test` depends on that)."""
    from pipeserve.common.model_files import resolve_model

    return resolve_model(QWEN).path  # ModelNotFoundError says to run `make models`


@pytest.fixture(scope="module")
def qwen_hf_tokenizer(qwen_path):
    """transformers' tokenizer built from the same GGUF's vocabulary and chat template."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(qwen_path.parent, gguf_file=qwen_path.name)


def _hf_prompt_ids(tok, case: str | list[dict[str, str]]) -> list[int]:
    if isinstance(case, str):
        return tok(case).input_ids
    text = tok.apply_chat_template(case, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def qwen_reference(qwen_path, qwen_hf_tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy continuation) per case from transformers in fp32: the model (~7 GB, 30-60 s
    to load) lives only inside this fixture, so it never shares memory with the cluster's nodes."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        qwen_path.parent, gguf_file=qwen_path.name, dtype=torch.float32
    ).eval()
    try:
        out = []
        for case in [*RAW, CHAT]:
            ids = _hf_prompt_ids(qwen_hf_tokenizer, case)
            with torch.inference_mode():
                gen = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                )
            out.append((ids, gen[0, len(ids) :].tolist()))
    finally:
        del model
        gc.collect()
    return out


@pytest.fixture(scope="module")
def cluster(qwen_path):
    c = start_cluster(QWEN, parts=3)
    yield c
    c.stop()


def _request(case: str | list[dict[str, str]]) -> pb.GenerateRequest:
    prompt: dict = (
        {"prompt": case}
        if isinstance(case, str)
        else {"messages": [tpb.ChatMessage(role=m["role"], content=m["content"]) for m in case]}
    )
    return pb.GenerateRequest(
        **prompt, max_tokens=NEW_TOKENS, sampling=pb.SamplingParams(temperature=0), ignore_eos=True
    )


# qwen_reference before cluster: module fixtures are set up in argument order, and the reference is
# freed before the nodes load
def test_qwen_cluster_greedy_equals_transformers(qwen_reference, cluster, qwen_hf_tokenizer):
    for case, (ids, ref) in zip([*RAW, CHAT], qwen_reference, strict=True):
        with grpc.insecure_channel(cluster.cfg.coordinator.address) as ch:
            msgs = list(pb_grpc.CoordinatorStub(ch).Generate(_request(case), timeout=300))
        got = [t for m in msgs for t in m.token_ids]
        assert msgs[-1].prompt_tokens == len(ids), case  # same template and tokenizer as transformers
        assert got == ref, (case, qwen_hf_tokenizer.decode(got), qwen_hf_tokenizer.decode(ref))
        assert [r.node_id for r in msgs[-1].route] == ["node1", "node2", "node3"]


def _owned(name: str, shard) -> bool:
    """Whether the stage `shard` reads GGUF tensor `name` (blk.N.* by layer; embedding; norm + head)."""
    if name.startswith("blk."):
        return shard.start_layer <= int(name.split(".")[1]) < shard.end_layer
    if name == "token_embd.weight":
        return shard.is_first
    return shard.is_last and name in ("output.weight", "output_norm.weight")


def test_qwen_nodes_hold_blocks_not_fp32(cluster, qwen_path):
    from pipeserve.common.model_files import open_gguf

    tensors = open_gguf(qwen_path).tensors
    assert {"Q4_K", "Q6_K"} <= {t.tensor_type.name for t in tensors}
    for node in cluster.nodes:
        loaded = node.runner.loaded
        shard = loaded.shard
        share = sum(t.n_bytes for t in tensors if _owned(t.name, shard))
        # the file's blocks as stored (the head is its own Q6_K tensor, not tied): an fp32 copy of
        # any matrix would be ~7x its Q4_K bytes
        assert loaded.param_bytes <= 1.05 * share, (node.node_id, loaded.param_bytes, share)
        assert {"Q4_K", "Q6_K"} <= set(loaded.tensor_types), (node.node_id, loaded.tensor_types)

"""The model engine against references: transformers logits and generate, split stages vs the
full model, cached decode vs full forward, ragged batches vs one-by-one, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeserve.common.errors import (
    CacheBudgetError,
    ContextLengthError,
    InvalidInputError,
    ModelFormatError,
    ModelNotFoundError,
    UnknownRequestError,
)
from pipeserve.common.model_files import resolve_model
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, generate
from pipeserve.modeling.loader import load_stage
from tests.engine_torch import run_stages

PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 216],
    [1, 9519, 28, 837, 253, 1345, 30, 216, 21, 22, 23, 24, 1083],
    [2, 17, 30, 99, 305],
]


def hf_model(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def last_logits_ref(ref, prompts: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([ref(torch.tensor([p])).logits[0, -1] for p in prompts])


def prefill(engines: list[StageEngine], prompts: list[list[int]], prefix: str = "r") -> torch.Tensor:
    chunks = [SeqChunk(f"{prefix}{i}", 0, p, GREEDY) for i, p in enumerate(prompts)]
    return run_stages(engines, chunks)


def test_smollm2_logits_match_transformers(smol_full, smol_reference):
    eng = StageEngine(smol_full)
    ours = prefill([eng], PROMPTS)  # one ragged batch of 3 prompts
    ref = last_logits_ref(smol_reference, PROMPTS)
    assert (ours - ref).abs().max().item() <= 1e-3
    # every position too, for the longest prompt
    with torch.inference_mode():
        full_ref = smol_reference(torch.tensor([PROMPTS[1]])).logits[0]
    eng2 = StageEngine(smol_full)
    n = len(PROMPTS[1])
    rows = [SeqChunk(f"p{k}", 0, PROMPTS[1][: k + 1], GREEDY) for k in range(n)]
    assert (run_stages([eng2], rows) - full_ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_checkpoints_match_transformers(arch, tiny_llama, tiny_gpt2):
    folder = tiny_llama if arch == "llama" else tiny_gpt2
    eng = StageEngine(load_stage(str(folder)))
    prompts = [[5, 9, 33, 100, 7], [300, 2, 4], [11] * 17]
    assert (prefill([eng], prompts) - last_logits_ref(hf_model(folder), prompts)).abs().max().item() <= 1e-4


def test_sharded_checkpoint_index_is_read(tiny_gpt2):
    assert (tiny_gpt2 / "model.safetensors.index.json").is_file()
    assert load_stage(str(tiny_gpt2), (2, 4)).shard.n_local == 2


def decode_trace(
    engines: list[StageEngine], prompt: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy prefill + `steps` cached decode steps; returns the tokens and each step's logits."""
    logits = [run_stages(engines, [SeqChunk("t", 0, prompt, GREEDY)])[0]]
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(run_stages(engines, [SeqChunk("t", len(tokens) - 1, [tokens[-1]], GREEDY)])[0])
    return tokens, logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_split_stages_equal_full_model(arch, tiny_llama, tiny_gpt2):
    folder = str(tiny_llama if arch == "llama" else tiny_gpt2)
    full_tokens, full_logits = decode_trace([StageEngine(load_stage(folder))], [3, 1, 4, 1, 5, 9, 2, 6], 20)
    for k in (1, 3, 5):
        engines = [StageEngine(load_stage(folder, (0, k))), StageEngine(load_stage(folder, (k, 6)))]
        tokens, logits = decode_trace(engines, [3, 1, 4, 1, 5, 9, 2, 6], 20)
        assert tokens == full_tokens
        assert max((a - b).abs().max().item() for a, b in zip(logits, full_logits, strict=True)) <= 1e-4
    three = [StageEngine(load_stage(folder, r)) for r in ((0, 2), (2, 4), (4, 6))]
    assert decode_trace(three, [3, 1, 4, 1, 5, 9, 2, 6], 20)[0] == full_tokens


def test_smollm2_split_equals_full(smol_full):
    prompt = PROMPTS[1]
    full_tokens, full_logits = decode_trace([StageEngine(smol_full)], prompt, 20)
    engines = [StageEngine(load_stage("smollm2-135m-instruct", r)) for r in ((0, 10), (10, 30))]
    tokens, logits = decode_trace(engines, prompt, 20)
    assert tokens == full_tokens
    assert max((a - b).abs().max().item() for a, b in zip(logits, full_logits, strict=True)) <= 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_decode_equals_full_forward(arch, tiny_llama, tiny_gpt2):
    folder = str(tiny_llama if arch == "llama" else tiny_gpt2)
    loaded = load_stage(folder)
    tokens, logits = decode_trace([StageEngine(loaded)], [7, 8, 9], 20)
    eng = StageEngine(loaded)
    for i, step_logits in enumerate(logits):
        full = run_stages([eng], [SeqChunk(f"f{i}", 0, tokens[: 3 + i], GREEDY)])[0]
        assert (full - step_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ragged_batch_equals_one_by_one(arch, tiny_llama, tiny_gpt2):
    folder = str(tiny_llama if arch == "llama" else tiny_gpt2)
    loaded = load_stage(folder)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 200, 300, 4, 5, 6], [9] * 30]
    alone = [generate([StageEngine(loaded)], [p], 12)[0] for p in prompts]
    assert generate([StageEngine(loaded)], prompts, 12) == alone
    # mixed steps: a prefill chunk and a later prefill chunk of another sequence ride with decodes
    eng = StageEngine(loaded)
    a = run_stages([eng], [SeqChunk("a", 0, prompts[1][:6], GREEDY), SeqChunk("b", 0, prompts[3], GREEDY)])
    b = run_stages(
        [eng], [SeqChunk("a", 6, prompts[1][6:], GREEDY), SeqChunk("b", 6, [int(a[1].argmax())], GREEDY)]
    )
    ref = run_stages([StageEngine(loaded)], [SeqChunk("x", 0, prompts[1], GREEDY)])
    assert (b[0] - ref[0]).abs().max().item() <= 1e-4


def test_greedy_generation_equals_transformers_generate(smol_full, smol_reference):
    from pipeserve.tokenizer.core import TokenizerCore

    tok = TokenizerCore.from_model("smollm2-135m-instruct")
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
    ]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    ours = generate([StageEngine(smol_full)], prompts, 32)
    for p, got in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            x = torch.tensor([p])  # the prompt contains <|im_end|> (id 2 = pad): pass the mask explicitly
            ref = smol_reference.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )[0, len(p) :].tolist()
        assert got == ref


def gguf_tensor_bytes(names: set[str]) -> dict[str, int]:
    """Bytes each named tensor takes in the embedded GGUF file."""
    from gguf import GGUFReader

    from pipeserve.common.model_files import embedded_gguf_path

    return {t.name: int(t.n_bytes) for t in GGUFReader(embedded_gguf_path()).tensors if t.name in names}


def test_stage_holds_only_its_layers_in_block_form(smol_full):
    """Weights stay as GGUF blocks: a stage holds exactly the file bytes of its own tensors."""
    from pipeserve.kernels import QLinear

    middle = load_stage("smollm2-135m-instruct", (10, 20))
    assert middle.model.embed_tokens is None and middle.model.lm_head is None
    names = {
        f"blk.{i}.{n}.weight"
        for i in range(10, 20)
        for n in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    }
    file_bytes = gguf_tensor_bytes(names)
    assert len(file_bytes) == 90
    assert middle.param_bytes == sum(file_bytes.values())  # no fp32 copy, no embedding, no head
    assert middle.tensor_types == {"Q4_1": 70}  # q|k|v and gate|up fused: 7 matrices per layer
    assert all(
        isinstance(m, QLinear)
        for m in (middle.model.layers[0].self_attn.qkv_proj, middle.model.layers[0].mlp.down_proj)
    )
    # the whole model: the tied head is the embedding's Q8_0 blocks, held once
    assert smol_full.model.lm_head.parts[0] is smol_full.model.embed_tokens.weight
    assert smol_full.tensor_types == {"Q4_1": 210, "Q8_0": 1}
    from gguf import GGUFReader

    from pipeserve.common.model_files import embedded_gguf_path

    whole_file = sum(int(t.n_bytes) for t in GGUFReader(embedded_gguf_path()).tensors)
    assert smol_full.param_bytes == whole_file


def _mapping_of(addr: int) -> str:
    """The path of the mapping that holds address `addr` in this process ('' if anonymous)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                parts = line.split()
                return parts[5] if len(parts) > 5 else ""
    raise AssertionError(f"address {addr:#x} is not mapped")


def test_a_first_stage_maps_its_embedding_and_a_tied_head_reads_it_in_place(smol_full):
    """A first stage only looks its embedding up by row: the blocks stay in a private map of the
    file, read at random (pages become resident as rows are used), and lookups equal the whole
    model's. A stage that also holds the tied head reads the same blocks in place from the file's
    map, as it reads every layer matrix (tests/test_engine_memory.py)."""
    first = load_stage("smollm2-135m-instruct", (0, 10))
    mapped = first.model.embed_tokens.weight
    assert _mapping_of(mapped.data.ctypes.data).endswith(".gguf")
    held = smol_full.model.embed_tokens.weight
    assert _mapping_of(held.data.ctypes.data).endswith(".gguf")
    layer_v = first.model.layers[0].self_attn.qkv_proj.parts[2]
    assert _mapping_of(layer_v.data.ctypes.data).endswith(".gguf")  # matrices are read in place
    # the mapped blocks count as the stage's weights (what it may touch)
    emb_bytes = gguf_tensor_bytes({"token_embd.weight"})["token_embd.weight"]
    assert first.param_bytes == emb_bytes + load_stage("smollm2-135m-instruct", (10, 20)).param_bytes
    ids = np.array([0, 1, 2, 17, 4095, 30000, 49151, 17])
    assert np.array_equal(mapped.rows(ids), held.rows(ids))
    assert np.array_equal(mapped.data, held.data)


def test_bad_inputs_raise_named_errors(tiny_llama, tmp_path, smol_full):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_model("./no-such-model.gguf")
    with pytest.raises(ModelNotFoundError, match=r"'gpt2'.*Point model_name at a local \.gguf file"):
        resolve_model("gpt2")  # conftest sets HF_HUB_OFFLINE: no traffic leaves the machine
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    with pytest.raises(ModelFormatError, match=r"broken\.gguf"):
        load_stage(str(corrupt))
    data = smol_full.source.path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=r"truncated\.gguf"):
        load_stage(str(truncated))
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text((tiny_llama / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_llama / "model.safetensors"))
    del weights["model.layers.3.mlp.up_proj.weight"]
    save_file(weights, str(missing / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        load_stage(str(missing))
    bad_cfg = json.loads((tiny_llama / "config.json").read_text()) | {"model_type": "bert"}
    (missing / "config.json").write_text(json.dumps(bad_cfg))
    with pytest.raises(ModelFormatError, match="bert"):
        load_stage(str(missing))

    eng = StageEngine(load_stage(str(tiny_llama)), cache_budget_tokens=64, max_context=40)
    with pytest.raises(InvalidInputError, match="empty batch"):
        eng.forward([])
    with pytest.raises(ContextLengthError, match="40"):
        eng.forward([SeqChunk("a", 0, list(range(41)))])
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        eng.forward([SeqChunk("a", 0, [5, 99999])])
    with pytest.raises(UnknownRequestError, match="zzz"):
        eng.forward([SeqChunk("zzz", 3, [5])])
    eng.forward([SeqChunk("a", 0, [5, 6, 7])])
    with pytest.raises(InvalidInputError, match="out of order"):
        eng.forward([SeqChunk("a", 9, [5])])
    with pytest.raises(CacheBudgetError, match="needs 5 more blocks of 16 tokens but 3 of 4 are free"):
        eng.forward([SeqChunk("b", 0, list(range(30))), SeqChunk("c", 0, list(range(35)))])
    assert set(eng.cache.seqs) == {"a"}  # the rejected batch left nothing behind
    assert eng.release(["a", "nope"]) == {"a": 3, "nope": 0}
    mid = StageEngine(load_stage(str(tiny_llama), (2, 4)))
    with pytest.raises(InvalidInputError, match="float32"):
        mid.forward([SeqChunk("a", 0, [1, 2])], np.zeros((2, 64), np.float64))
    with pytest.raises(InvalidInputError, match=r"\[2, 64\]"):
        mid.forward([SeqChunk("a", 0, [1, 2])], np.zeros((3, 64), np.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_checkpoints_stay_16_bit(dtype, tiny_llama, tmp_path):
    """A bf16/fp16 safetensors checkpoint keeps its dtype in memory (half the bytes of fp32) and
    computes exactly what transformers computes in fp32 on the same (upcast) weights."""
    import shutil

    import transformers

    folder = tmp_path / "half"
    shutil.copytree(tiny_llama, folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.to(dtype).save_pretrained(folder)
    loaded = load_stage(str(folder))
    name = "BF16" if dtype == torch.bfloat16 else "F16"
    assert loaded.tensor_types == {name: 6 * 7 + 2}  # 6 layers x 7 matrices, embedding, untied head
    fp32 = load_stage(str(tiny_llama))
    assert abs(loaded.param_bytes / fp32.param_bytes - 0.5) < 0.01  # norms stay fp32: a few bytes more
    prompts = [[5, 9, 33, 100, 7], [300, 2, 4]]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = prefill([StageEngine(loaded)], prompts)
    assert (ours - last_logits_ref(ref, prompts)).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "kind", ["smollm2", "qwen2", "qwen3", "llama_bias", "llama_gelu", "llama_rope_yarn", "mistral", "phi3"]
)
def test_llama_layer_forward_equals_its_modules_bit_for_bit(kind, smol_full, tmp_path, monkeypatch):
    """LlamaLayer.forward (native calls on raw pointers into buffers made once per step) gives
    exactly the logits of the same layers composed from their modules (tests/layer_reference.py):
    a ragged prefill, decode steps at batch 3 and at batch 1, for every variant of the family:
    q|k|v biases (Qwen2), every bias, q/k norms (Qwen3), GELU, yarn rope, a sliding window
    (Mistral), Phi-3's fused tensors."""
    from pipeserve.modeling.llama import LlamaLayer
    from tests.layer_reference import module_forward
    from tests.tiny_models import make_tiny

    loaded = smol_full if kind == "smollm2" else load_stage(str(make_tiny(kind, tmp_path / kind)))
    assert all(type(layer) is LlamaLayer for layer in loaded.model.layers)

    def trace() -> list[torch.Tensor]:
        eng = StageEngine(loaded)
        v = loaded.cfg.vocab_size  # (the tiny models' is 320)
        prompts = [[t % v for t in p] for p in (PROMPTS[0], PROMPTS[1], PROMPTS[2][:2])]
        out = run_stages([eng], [SeqChunk(f"s{i}", 0, p, GREEDY) for i, p in enumerate(prompts)])
        logits = [out]
        nxt = [int(r.argmax()) for r in out]
        for step in range(6):
            chunks = [SeqChunk(f"s{i}", len(p) + step, [nxt[i]], GREEDY) for i, p in enumerate(prompts)]
            out = run_stages([eng], chunks)
            logits.append(out)
            nxt = [int(r.argmax()) for r in out]
        single = run_stages([eng], [SeqChunk("s0", len(prompts[0]) + 6, [nxt[0]], GREEDY)])  # B = 1
        return [*logits, single]

    native = trace()
    with monkeypatch.context() as m:
        m.setattr(LlamaLayer, "forward", module_forward)
        modules = trace()
    assert all(torch.equal(a, b) for a, b in zip(native, modules, strict=True))


def _logit_trace(loaded, seq: list[int], kv_dtype: str, alone: bool) -> dict[int, np.ndarray]:
    """Logits at positions 39..59 of `seq`: alone, one token per step; or prefilled as one chunk
    of 40 beside two other prompts, then decoded beside a third prompt's prefill (step 45)."""
    from pipeserve.modeling.generate import run_stages as run_numpy

    eng = StageEngine(loaded, kv_dtype=kv_dtype)
    rng = np.random.default_rng(1)
    vocab = loaded.cfg.vocab_size
    others = [[int(t) for t in rng.integers(1, vocab, n)] for n in (5, 33, 17)]
    out: dict[int, np.ndarray] = {}
    if alone:
        for i, t in enumerate(seq):
            logits = run_numpy([eng], [SeqChunk("a", i, [t], GREEDY)])[0]
            if i >= 39:
                out[i] = logits.copy()
        return out
    first = [SeqChunk("o0", 0, others[0], GREEDY), SeqChunk("b", 0, seq[:40], GREEDY)]
    out[39] = run_numpy([eng], [*first, SeqChunk("o1", 0, others[1], GREEDY)])[1].copy()
    for i in range(40, 60):
        chunks = [SeqChunk("b", i, [seq[i]], GREEDY)]
        if i == 45:
            chunks.append(SeqChunk("o2", 0, others[2], GREEDY))
        out[i] = run_numpy([eng], chunks)[0].copy()
    return out


@pytest.mark.parametrize(
    "model,kv_dtype",
    [
        ("smollm2", "f32"),
        ("smollm2", "q8_0"),
        ("qwen", "f32"),
        ("gemma3", "f32"),
        ("llama", "f32"),
        ("gpt2", "f32"),
    ],
)
def test_batch_invariant_logits_do_not_depend_on_the_batch(
    model, kv_dtype, smol_full, tiny_llama, tiny_gpt2, gemma_path
):
    """node_defaults.batch_invariant (kernels.set_batch_invariant): a sequence's logits, prefilled
    in a chunk beside other prompts and decoded beside another prefill, equal bit for bit the
    logits of feeding it one token at a time alone (which the mode leaves as they were), for every
    KV type (q8_0 rounds K/V rows to a quantum, where a last-bit difference can move a value by a
    whole step) and every kind of layer: Q4_1 (SmolLM2), Q4_K / Q6_K with q/k/v biases (Qwen2.5),
    Gemma 3's sliding windows and GELU, fp32 checkpoints (tiny Llama, GPT-2's LayerNorm in numpy).
    Off (the default), the same comparison differs in the last bits on a SIMD path: what the mode
    is for."""
    from pipeserve import kernels

    if model == "smollm2":
        loaded = smol_full
    elif model == "qwen":
        loaded = load_stage(resolve_model("qwen2.5-coder-1.5b-instruct"))
    elif model == "gemma3":
        loaded = load_stage(resolve_model("gemma3-270m"))  # gemma_path: make models assembled it
    else:
        loaded = load_stage(str(tiny_llama if model == "llama" else tiny_gpt2))
    seq = [int(t) for t in np.random.default_rng(0).integers(1, loaded.cfg.vocab_size, 60)]
    default = _logit_trace(loaded, seq, kv_dtype, alone=True)
    batched = _logit_trace(loaded, seq, kv_dtype, alone=False)
    if kernels.get_isa() != "generic":
        assert any(not np.array_equal(default[i], batched[i]) for i in default), "the batch changed no bit"
    kernels.set_batch_invariant(True)
    try:
        alone = _logit_trace(loaded, seq, kv_dtype, alone=True)
        together = _logit_trace(loaded, seq, kv_dtype, alone=False)
    finally:
        kernels.set_batch_invariant(False)
    for i in alone:
        assert np.array_equal(alone[i], together[i]), f"{model} {kv_dtype}: position {i} depends on its batch"
        assert np.array_equal(alone[i], default[i]), f"{model} {kv_dtype}: one-token decoding changed at {i}"

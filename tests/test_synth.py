"""Synthetic models (modeling/synth.py): the planned layout against the published files (the full
Llama-3.1-8B and Qwen2.5-7B specs are checked without writing them; the Qwen2.5-Coder-1.5B spec
against the real file's header), written files against their plan, determinism, our engine
against transformers on the same file, and both tokenizers (ours and transformers') on them.
"""

from __future__ import annotations

import filecmp
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeserve.cli import main
from pipeserve.common.gguf_file import GGUFFile
from pipeserve.common.model_files import ModelSource, resolve_model
from pipeserve.modeling import synth
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, generate
from pipeserve.modeling.loader import load_stage, read_config
from pipeserve.tokenizer.core import TokenizerCore
from tests.engine_torch import run_stages
from tests.tiny_models import llama3_rope_factors

LAYERS = 2  # the written test models are cut to 2 layers (the vocabulary is most of their bytes)
# ids from every part of the vocabularies: text, [PAD] placeholders, special tokens
PROMPTS = {
    "llama-test": [128000, 9906, 1917, 11, 856, 836, 374, 70000, 13, 128006, 882, 128007, 271, 40, 2, 5000],
    "qwen-test": [151644, 872, 198, 9707, 1879, 11, 151937, 13, 151645, 198, 151644, 77091, 198, 40, 2, 5000],
}
N_NEW = 16


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {spec: synth.write(spec, root / f"{spec}.gguf", 0, LAYERS) for spec in ("llama-test", "qwen-test")}


def table(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """A GGUF's tensors: name -> (shape in numpy order, type name)."""
    return {t.name: (t.shape[::-1], t.tensor_type.name) for t in GGUFFile(path).tensors}


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: t.data.tobytes() for t in GGUFFile(path).tensors}


# ---------------------------------------------------------------------------------- the plans


def test_llama_3_1_8b_plan_is_the_published_q4_k_m():
    """292 tensors as llama.cpp's quantize writes Llama-3.1-8B-Instruct at Q4_K_M: 66 F32 (norms,
    rope_freqs), 193 Q4_K, 33 Q6_K (output, and attn_v and ffn_down of the 16 use-more-bits
    layers); their bytes, 4,912,898,304, plus the real file's ~7.8 MB header (its 128,256 tokens and
    280,147 merges) make the published 4,920,734,016."""
    p = synth.plan("llama-3.1-8b")
    by = {t.name: t for t in p}
    assert len(p) == 292
    assert Counter(t.type_name for t in p) == {"F32": 66, "Q4_K": 193, "Q6_K": 33}
    assert (by["token_embd.weight"].shape, by["token_embd.weight"].type_name) == ((128256, 4096), "Q4_K")
    assert (by["output.weight"].shape, by["output.weight"].type_name) == ((128256, 4096), "Q6_K")
    assert by["rope_freqs.weight"].shape == (64,) and by["output_norm.weight"].shape == (4096,)
    shapes = {
        "attn_norm.weight": (4096,),
        "attn_q.weight": (4096, 4096),
        "attn_k.weight": (1024, 4096),
        "attn_v.weight": (1024, 4096),
        "attn_output.weight": (4096, 4096),
        "ffn_norm.weight": (4096,),
        "ffn_gate.weight": (14336, 4096),
        "ffn_up.weight": (14336, 4096),
        "ffn_down.weight": (4096, 14336),
    }
    more_bits = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for i in range(32):
        assert {n: by[f"blk.{i}.{n}"].shape for n in shapes} == shapes
        for n in ("attn_v.weight", "ffn_down.weight"):
            assert by[f"blk.{i}.{n}"].type_name == ("Q6_K" if i in more_bits else "Q4_K")
    data = sum(t.nbytes for t in p)
    assert data == 4_912_898_304
    assert 0 < 4_920_734_016 - data < 8 * 2**20


def test_qwen2_5_7b_plan():
    """339 tensors as in Qwen's Q4_K_M files: 141 F32 (norms, q/k/v biases), 169 Q4_K, 29 Q6_K;
    an untied head; 4.68 GB of tensor data."""
    p = synth.plan("qwen2.5-7b")
    by = {t.name: t for t in p}
    assert len(p) == 339
    assert Counter(t.type_name for t in p) == {"F32": 141, "Q4_K": 169, "Q6_K": 29}
    assert by["token_embd.weight"].shape == by["output.weight"].shape == (152064, 3584)
    assert [by[f"blk.27.attn_{k}.bias"].shape for k in "qkv"] == [(3584,), (512,), (512,)]
    assert by["blk.0.ffn_down.weight"].shape == (3584, 18944)
    assert sum(t.nbytes for t in p) == 4_677_120_000


def test_qwen_coder_plan_and_metadata_equal_the_real_file():
    """The spec of the named model Qwen2.5-Coder-1.5B-Instruct against that real GGUF: the same
    tensors (names, shapes, types, bytes), hyper-parameters and tokenizer keys (copied unchanged:
    151,936 tokens, no padding). llama.cpp's rule counts attn_v / ffn_down tensors in the order it
    processes them: current llama.cpp sorts them by layer (use_more_bits(layer)), the llama.cpp
    that made this file took the converter's order (layers 0, 1, 10, 11, ...), so its 14 Q6_K
    layers are others than ours, by the same rule."""
    real = resolve_model("qwen2.5-coder-1.5b-instruct").path
    theirs = table(real)
    p = synth.plan("qwen2.5-coder-1.5b")
    assert {n: shape for n, (shape, _) in theirs.items()} == {t.name: t.shape for t in p}
    for t in p:
        if not t.name.endswith(("attn_v.weight", "ffn_down.weight")):
            assert theirs[t.name][1] == t.type_name, t.name
    for kind in ("attn_v.weight", "ffn_down.weight"):
        order = [int(t.name.split(".")[1]) for t in GGUFFile(real).tensors if t.name.endswith(kind)]
        assert order[:4] == [0, 1, 10, 11]
        q6 = {order[k] for k in range(28) if synth.use_more_bits(k, 28)}
        assert {i for i in range(28) if theirs[f"blk.{i}.{kind}"][1] == "Q6_K"} == q6
        assert {int(t.name.split(".")[1]) for t in p if t.name.endswith(kind) and t.type_name == "Q6_K"} == {
            i for i in range(28) if synth.use_more_bits(i, 28)
        }
    g = GGUFFile(real)
    assert sum(t.nbytes for t in p) == real.stat().st_size - g.data_offset == 1_111_370_240
    ours = {k: v for k, _, v in synth.metadata("qwen2.5-coder-1.5b")}
    copied = [k for k in g.fields if k.startswith(("qwen2.", "tokenizer.")) or k == "general.file_type"]
    assert len(copied) == 19 and set(copied) <= set(ours)
    for k in copied:
        want = g.fields[k].contents()
        assert (np.float32(ours[k]) == np.float32(want)) if isinstance(want, float) else ours[k] == want, k


def test_llama3_rope_factors_are_convert_hf_to_ggufs():
    """rope_freqs as convert_hf_to_gguf computes them from Llama 3.1's rope_scaling (its torch code is
    tests/tiny_models.llama3_rope_factors; numpy's float32 pow differs from torch's by an ulp)."""
    s = synth.SPECS["llama-3.1-8b"]
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    hp = {
        "rope_parameters": rope | {"original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        "hidden_size": 4096,
        "num_attention_heads": 32,
    }
    ours = synth.llama3_rope_factors(s)
    np.testing.assert_allclose(ours, llama3_rope_factors(hp).numpy(), rtol=1e-6)
    assert ours[0] == 1.0 and ours[-1] == 8.0 and ((ours > 1) & (ours < 8)).any()


# ----------------------------------------------------------------------------- written files


@pytest.mark.parametrize("spec", ["llama-test", "qwen-test"])
def test_written_file_is_its_plan(spec, written):
    path = written[spec]
    p = synth.plan(spec, LAYERS)
    g = GGUFFile(path)
    assert table(path) == {t.name: (t.shape, t.type_name) for t in p}
    assert [t.name for t in g.tensors] == [t.name for t in p]
    assert path.stat().st_size == g.data_offset + sum(-(-t.nbytes // 32) * 32 for t in p)
    for key, _, value in synth.metadata(spec, 0, LAYERS):
        got = g.fields[key].contents()
        assert (np.float32(got) == np.float32(value)) if isinstance(value, float) else got == value, key
    s = synth.SPECS[spec]
    cfg = read_config(ModelSource(spec, "gguf", path))
    assert (cfg.n_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (
        LAYERS,
        s.hidden,
        s.ffn,
        s.vocab,
    )
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.qkv_bias, cfg.tie_word_embeddings) == (
        s.n_heads,
        s.n_kv_heads,
        s.arch == "qwen2",
        False,
    )


def test_same_seed_same_bytes(written, tmp_path, capsys):
    """The CLI with the same spec, seed and layers writes the fixture's bytes; a cut-down model
    holds the same values for the tensors it shares (where llama.cpp's rule gives them the same
    type); another seed gives other values."""
    again = tmp_path / "again.gguf"
    assert main(["synth", "--spec", "llama-test", "--layers", str(LAYERS), "--out", str(again)]) == 0
    assert str(again) in capsys.readouterr().out
    assert filecmp.cmp(again, written["llama-test"], shallow=False)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed
    full = tensor_bytes(written["llama-test"])
    one = tensor_bytes(synth.write("llama-test", tmp_path / "one.gguf", 0, 1))
    types = dict(table(written["llama-test"]))
    same_type = [n for n, (_, t) in table(tmp_path / "one.gguf").items() if types[n][1] == t]
    assert (
        "blk.0.attn_q.weight" in same_type and "blk.0.attn_v.weight" not in same_type
    )  # Q6_K in a 1-layer model
    assert all(one[n] == full[n] for n in same_type)
    other = tensor_bytes(synth.write("llama-test", tmp_path / "s1.gguf", 1, 1))
    assert other["rope_freqs.weight"] == one["rope_freqs.weight"]
    assert all(other[n] != one[n] for n in one if n != "rope_freqs.weight")


def test_placeholder_vocabulary(written, tmp_path):
    """--no-tokenizer: llama.cpp's placeholder vocabulary of the spec's size (the model type "none",
    no tokens), no real GGUF needed; the same tensors, and the engine loads it and gives the logits
    of the file with the real tokenizer."""
    out = tmp_path / "none.gguf"
    assert (
        main(["synth", "--spec", "qwen-test", "--layers", str(LAYERS), "--out", str(out), "--no-tokenizer"])
        == 0
    )
    f = GGUFFile(out)
    assert f.fields["tokenizer.ggml.model"].contents() == "none"
    assert f.fields["qwen2.vocab_size"].contents() == synth.SPECS["qwen-test"].vocab
    assert not [k for k in f.fields if k.startswith("tokenizer.") and k != "tokenizer.ggml.model"]
    assert tensor_bytes(out) == tensor_bytes(written["qwen-test"])
    logits = []
    for path in (out, written["qwen-test"]):
        eng = StageEngine(load_stage(ModelSource("m", "gguf", path)))
        logits.append(eng.forward([SeqChunk("r", 0, [5, 6, 7], GREEDY)]).logits)
    assert logits[0] is not None and logits[0].shape == (1, synth.SPECS["qwen-test"].vocab)
    np.testing.assert_array_equal(logits[0], logits[1])


# ------------------------------------------------------------------------------ against transformers


def hf_model(spec: str, path: Path):
    """transformers' model from the GGUF. Its config reader ignores rope_freqs (Llama 3's scaling
    is given as the config's rope_parameters) and takes a Qwen2 vocabulary size from the
    tokenizer's token list (given here, as the file has no qwen2.vocab_size)."""
    import transformers

    s = synth.SPECS[spec]
    cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if s.llama3_rope:
        cfg.rope_parameters = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
            rope_theta=s.rope_theta,
        )
    cfg.vocab_size = s.vocab
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=cfg, dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("spec", ["llama-test", "qwen-test"])
def test_engine_equals_transformers(spec, written, tmp_path):
    """Every prefix's logits within 1e-4 of transformers' and the same 16 greedy tokens. transformers'
    GGUF reader parses every metadata array twice (~10 s for these vocabularies), so it reads a twin
    written without the tokenizer: the same tensor bytes, checked."""
    twin = synth.write(spec, tmp_path / f"{spec}.gguf", 0, LAYERS, tokenizer=False)
    a, b = GGUFFile(twin), GGUFFile(written[spec])
    assert a.path.read_bytes()[a.data_offset :] == b.path.read_bytes()[b.data_offset :]
    ref = hf_model(spec, twin)
    prompt = PROMPTS[spec]
    eng = StageEngine(load_stage(str(written[spec])))
    ours = run_stages([eng], [SeqChunk(f"p{k}", 0, prompt[: k + 1], GREEDY) for k in range(len(prompt))])
    with torch.inference_mode():
        want = ref(torch.tensor([prompt])).logits[0]
    assert (ours - want).abs().max().item() <= 1e-4
    assert torch.isfinite(ours).all() and 0.5 < ours.std().item() < 2  # logits ~N(0, 1), as planned
    x = torch.tensor([prompt])
    with torch.inference_mode():
        hf_tokens = ref.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    tokens = generate([StageEngine(load_stage(str(written[spec])))], [prompt], N_NEW)[0]
    assert tokens == hf_tokens
    assert len(set(tokens)) > N_NEW // 2  # gibberish, but not one token repeated


# --------------------------------------------------------------------------------- tokenizers


def test_llama3_like_tokenizer(written):
    """Ours and transformers' tokenizers read the built Llama-3-like vocabulary alike: BOS added,
    Llama 3's special tokens whole, the chat template in Llama 3's format."""
    import transformers

    path = written["llama-test"]
    core = TokenizerCore.from_model(str(path))
    assert core.vocab_size == 128256 and core.bos_token_id == 128000 and core.eos_token_ids == [128009]
    chat = core.apply_chat_template([{"role": "user", "content": "Hi there!"}])
    assert chat == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>" + (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = core.encode(chat, add_special_tokens=False)
    assert ids[:2] == [128000, 128006] and ids.count(128007) == 2 and ids.count(128009) == 1
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("Hello world, this is a test of 12345 numbers!", "  spaces\nand\ttabs", "naïve café ☕"):
        assert core.encode(text) == hf(text).input_ids
        assert core.encode(text)[0] == 128000
        assert core.decode(core.encode(text)) == text
    assert core.encode(chat, add_special_tokens=False) == hf(chat, add_special_tokens=False).input_ids


def test_qwen_tokenizer_is_the_real_one_padded(written):
    """The Qwen specs carry Qwen2.5-Coder-1.5B's tokenizer, padded from 151,936 to 152,064 tokens as
    llama.cpp's converter pads: our tokenizer gives the real file's ids and chat prompt."""
    real = TokenizerCore.from_model("qwen2.5-coder-1.5b-instruct")
    core = TokenizerCore.from_model(str(written["qwen-test"]))
    assert core.vocab_size == 152064 and real.vocab_size == 151936
    tokens = GGUFFile(written["qwen-test"]).fields["tokenizer.ggml.tokens"].contents()
    assert tokens[151935] == "[PAD151935]" and tokens[-1] == "[PAD152063]"
    for text in ("def quicksort(arr):\n    return arr", "Hello, 世界! 12345"):
        assert core.encode(text) == real.encode(text)
    msgs = [{"role": "user", "content": "Write a haiku."}]
    assert core.apply_chat_template(msgs) == real.apply_chat_template(msgs)
    assert (core.bos_token_id, core.eos_token_ids) == (real.bos_token_id, real.eos_token_ids)

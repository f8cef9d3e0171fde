"""Tiny random checkpoints of every architecture we serve, and their GGUF twins.

`make_tiny(kind, folder)` builds a transformers model with every parameter randomized (so that
ignoring any bias, norm or scale changes the logits) and saves it as an fp32 safetensors folder.
`write_gguf(folder, out)` converts such a folder the way llama.cpp's convert_hf_to_gguf.py does
(arch names, metadata keys, tensor names, Q/K row permutation, Gemma's norm + 1, rope_freqs, fused
Phi-3 tensors, transposed GPT-2 matrices). Used by tests/test_architectures.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB = 320
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Rope scaling strong enough that ignoring it changes the logits of a 40-token prompt.
ROPE_LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
    rope_theta=10000.0,
)
ROPE_LINEAR = dict(rope_type="linear", factor=4.0, rope_theta=10000.0)
ROPE_YARN = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32, rope_theta=10000.0)

# kind -> (transformers config class, model class, config kwargs on top of COMMON)
KINDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama_rope_llama3": (  # tied head, like Llama 3.2 1B/3B
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_parameters=ROPE_LLAMA3, tie_word_embeddings=True),
    ),
    "llama_rope_linear": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=ROPE_LINEAR)),
    "llama_rope_yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=ROPE_YARN)),
    "llama_gelu": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_act="gelu")),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v always carry a bias
    # head_dim != hidden / heads, as in Qwen3-0.6B (1024 / 16 = 64, head_dim 128); tied head
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=6,
            head_dim=32,
            sliding_window=8,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            query_pre_attn_scalar=24,  # != head_dim: 1/sqrt(24), not 1/sqrt(32)
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            rms_norm_eps=1e-6,
        ),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(original_max_position_embeddings=256)),
    # the sliding windows the README claims for Phi-3 (every layer) and Qwen2 (layers from
    # max_window_layers on, when use_sliding_window)
    "phi3_window": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(original_max_position_embeddings=256, sliding_window=8),
    ),
    "qwen2_window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
}
# A GGUF has no key for query_pre_attn_scalar: llama.cpp scales Gemma 3 attention by
# 1/sqrt(attention.key_length) (1/sqrt(hidden/heads) only for the 62-layer 27B). GGUF tests of
# Gemma 3 therefore start from this checkpoint, whose scalar equals head_dim like every release.
KINDS["gemma3_gguf"] = (
    "Gemma3TextConfig",
    "Gemma3ForCausalLM",
    KINDS["gemma3"][2] | dict(query_pre_attn_scalar=32),
)
N_LAYERS = {k: v[2].get("num_hidden_layers", COMMON["num_hidden_layers"]) for k, v in KINDS.items()}


def hf_config(kind: str) -> Any:
    import transformers

    cfg_cls, _, extra = KINDS[kind]
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
    return getattr(transformers, cfg_cls)(**(COMMON | extra))


def make_tiny(kind: str, folder: Path, seed: int = 0) -> Path:
    """A random tiny `kind` checkpoint (fp32 safetensors + byte-level BPE tokenizer) in folder."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, KINDS[kind][1])(hf_config(kind)).eval()
    gemma = kind.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
            else:  # every vector weight here is a norm scale; Gemma's multiply by (1 + w)
                p.normal_(0, 0.1)
                if not gemma:
                    p.add_(1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def write_tokenizer(folder: Path) -> None:
    """The byte-level BPE of tests/conftest.py: 320 tokens, <unk>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, this is pipeserve",
        "Paris is in France",
    ]
    tok.train_from_iterator(text * 50, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
    )


# ---------------------------------------------------------------------------------------------
# GGUF, as convert_hf_to_gguf.py writes it

# HF model_type -> GGUF general.architecture (convert writes dense Mistral as llama)
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
}


def write_gguf(
    folder: Path,
    out: Path,
    qtype: str = "F32",
    extra_fields: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Convert a make_tiny folder to one GGUF file at `out`.

    qtype "F32" keeps every tensor fp32; "Q8_0" quantizes the 2-D matrices (norms, biases,
    position embeddings and rope_freqs stay F32, as in convert --outtype q8_0). `extra_fields`
    (key -> str/float/int/bool, added or overriding) and `extra_tensors` (GGUF name -> array)
    exist for the refusal tests. Raises ValueError for what a GGUF cannot express.
    """
    import gguf
    from safetensors.torch import load_file

    hp: dict[str, Any] = json.loads((folder / "config.json").read_text())
    mt = hp["model_type"]
    arch = GGUF_ARCH[mt]
    if arch == "llama" and hp.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hp['hidden_act']!r}: llama.cpp's llama arch always uses SiLU")
    if arch == "qwen2" and hp.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True: llama.cpp's qwen2 arch has no sliding-window key")
    if arch == "gemma3" and hp["query_pre_attn_scalar"] != hp["head_dim"]:
        raise ValueError(
            f"query_pre_attn_scalar={hp['query_pre_attn_scalar']!r}: a GGUF has no key for it "
            f"(llama.cpp uses 1/sqrt(key_length={hp['head_dim']}))"
        )
    tensors = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    n_layers: int = hp["num_hidden_layers"] if "num_hidden_layers" in hp else hp["n_layer"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(f"tiny-{mt}")
    w.add_type("model")
    rope = dict(hp.get("rope_parameters") or {})
    if arch == "gpt2":
        _gpt2_params(w, hp, n_layers)
    elif arch == "phi3":
        _phi3_params(w, hp, rope, n_layers)
    else:
        _text_params(w, hp, rope, n_layers)
        if arch == "llama":
            w.add_vocab_size(hp["vocab_size"])
            w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
            # convert's LlamaModel does not write sliding_window (a converted Mistral 7B v0.1 runs
            # with full attention in llama.cpp). We write the key llama.cpp defines for it, so that
            # the file states what the checkpoint computes.
            if hp.get("sliding_window"):
                w.add_sliding_window(hp["sliding_window"])
        if arch == "gemma3":
            _gemma3_params(w, hp)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(w, folder, hp)
    for key, value in (extra_fields or {}).items():
        _add_field(w, key, value)

    qt = gguf.GGMLQuantizationType[qtype]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tok = json.loads((folder / "tokenizer.json").read_text())
    n_vocab_real = len(tok["model"]["vocab"]) + len(tok["added_tokens"])  # convert's count, for Gemma
    for name, data in _gguf_tensors(arch, hp, tensors, name_map, n_vocab_real):
        arr = data.numpy().astype(np.float32)
        keep_f32 = (
            arr.ndim <= 1
            or name.endswith("_norm.weight")
            or not name.endswith(".weight")
            or name == "position_embd.weight"
        )
        if qt == gguf.GGMLQuantizationType.F32 or keep_f32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _text_params(w: Any, hp: dict[str, Any], rope: dict[str, Any], n_layers: int) -> None:
    """convert's TextModel.set_gguf_parameters for the keys our kinds have."""
    import gguf

    w.add_block_count(n_layers)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    full = rope.get("full_attention", rope)
    rope_type, factor = full.get("rope_type"), full.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
        if (v := full.get("extrapolation_factor")) is not None:
            w.add_rope_scaling_yarn_ext_factor(v)
        if (v := full.get("attention_factor", full.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(v)
        if (v := full.get("beta_fast")) is not None:
            w.add_rope_scaling_yarn_beta_fast(v)
        if (v := full.get("beta_slow")) is not None:
            w.add_rope_scaling_yarn_beta_slow(v)
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    # "llama3": the rope_freqs tensor carries it; "default"/"dynamic": no key
    if (theta := full.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _gemma3_params(w: Any, hp: dict[str, Any]) -> None:
    """convert's Gemma3Model.set_gguf_parameters, less the keys it re-writes with the values the
    base already wrote (context_length, head_count(_kv), rms eps, key/value_length, freq_base)."""
    if hp.get("attn_logit_softcapping") is not None:
        raise ValueError("attn_logit_softcapping: convert asserts Gemma 3 has none")
    if final := hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(final)
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])
    # llama.cpp derives the layer pattern itself (every 6th layer full); make sure ours is that one
    expected = [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(hp["layer_types"]))
    ]
    if hp["layer_types"] != expected:
        raise ValueError(f"layer_types={hp['layer_types']!r}: llama.cpp assumes 5 sliding : 1 full")


def _phi3_params(w: Any, hp: dict[str, Any], rope: dict[str, Any], n_layers: int) -> None:
    """convert's Phi3MiniModel.set_gguf_parameters (no long/short factors: no rope scaling)."""
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    rot_pct = rope.get("partial_rotary_factor", hp.get("partial_rotary_factor", 1.0))
    orig = rope.get("original_max_position_embeddings", hp.get("original_max_position_embeddings"))
    if rope.get("long_factor"):
        raise ValueError("longrope factors are not written by this fixture")
    w.add_context_length(hp["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(n_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(int(rot_pct * n_embd) // n_head)
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_sliding_window(hp.get("sliding_window") or 0)


def _gpt2_params(w: Any, hp: dict[str, Any], n_layers: int) -> None:
    """convert's GPT2Model.set_gguf_parameters. (transformers 5 no longer writes n_ctx; convert
    reads it, so we fall back to n_positions, which is what it meant.)"""
    w.add_block_count(n_layers)
    w.add_context_length(hp.get("n_ctx", hp["n_positions"]))
    w.add_embedding_length(hp["n_embd"])
    w.add_feed_forward_length(4 * hp["n_embd"])
    w.add_head_count(hp["n_head"])
    w.add_layer_norm_eps(hp["layer_norm_epsilon"])


def llama3_rope_factors(hp: dict[str, Any]) -> torch.Tensor:
    """convert's LlamaModel.generate_extra_tensors: per-frequency divisors of the rope
    frequencies (llama.cpp: theta_i = pos * base^(-2i/d) / rope_freqs[i])."""
    rp = hp["rope_parameters"]
    base = rp.get("rope_theta", 10000.0)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert's LlamaModel.permute: rotate-half pairs (i, i + d/2) -> interleaved (2i, 2i + 1),
    per head, for weight rows and bias entries alike."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(
    arch: str, hp: dict[str, Any], tensors: dict[str, torch.Tensor], name_map: Any, n_vocab_real: int
):
    """(GGUF name, tensor) in convert's order: extra tensors first, then the checkpoint's."""
    if arch == "llama" and (hp.get("rope_parameters") or {}).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(hp)
    for hf_name in sorted(tensors):
        data = tensors[hf_name]
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")):
            continue
        if arch == "llama":
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute(data, hp["num_attention_heads"])
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute(data, hp["num_key_value_heads"])
        elif arch == "gemma3":
            if hf_name.endswith("norm.weight"):  # Gemma3RMSNorm computes x * (1 + w)
                data = data + 1
            if hf_name.endswith("embed_tokens.weight"):  # convert drops rows past the tokenizer
                data = data[:n_vocab_real]
        elif arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.transpose(1, 0)  # Conv1D stores [in, out]
        new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"cannot map tensor {hf_name!r} for arch {arch}")
        yield new, data.contiguous()


def _add_vocab(w: Any, folder: Path, hp: dict[str, Any]) -> None:
    """convert's _set_vocab_gpt2: byte-level BPE tokens, types, merges and special ids."""
    import gguf

    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    special = {t["content"] for t in tok["added_tokens"] if t.get("special")}
    for t in tok["added_tokens"]:
        vocab[t["content"]] = t["id"]
    n_vocab = hp["vocab_size"]
    rev = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(rev[i])
            types.append(gguf.TokenType.CONTROL if rev[i] in special else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # ByteLevel(use_regex=True) splits with GPT-2's regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def _add_field(w: Any, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, bool):
        w.add_key_value(key, value, gguf.GGUFValueType.BOOL)
    elif isinstance(value, int):
        w.add_key_value(key, value, gguf.GGUFValueType.UINT32)
    elif isinstance(value, float):
        w.add_key_value(key, value, gguf.GGUFValueType.FLOAT32)
    else:
        w.add_key_value(key, str(value), gguf.GGUFValueType.STRING)

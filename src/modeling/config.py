"""Architecture hyper-parameters and the pipeline stage type (`Shard`).

`ModelConfig` is read from a Hugging Face config.json (`from_hf`) or a GGUF header (`from_gguf`) by
the loader. Every key that changes the math is either read into a field here or refused with an
error naming the key and its value: a model we cannot compute exactly never loads. `Shard` is the
half-open layer range one node owns, used the same way by config, proto, node and tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeserve.common.errors import ModelFormatError
from pipeserve.common.shard import Shard  # noqa: F401 (the layer range; the stages import it from here too)

# The stage class that computes a model: llama.py (Llama, Mistral, Qwen2, Qwen3), phi3.py, gemma3.py, gpt2.py
Arch = Literal["llama", "phi3", "gemma3", "gpt2"]
LayerType = Literal["full", "sliding"]

# Activations of the gated MLP that we compute, by their transformers names.
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: inverse frequencies theta^(-2i/d), rescaled by `kind`.

    linear: every frequency / factor. llama3: low frequencies / factor, high kept, a smooth ramp
    between (wavelengths vs original_max_position / low|high_freq_factor). yarn: a ramp between
    interpolated and extrapolated frequencies over the dimensions set by beta_fast/beta_slow, and
    cos/sin multiplied by attention_factor. `freq_factors` (a GGUF rope_freqs tensor) divides them.
    """

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3", "yarn"] = "default"
    factor: float = 1.0
    original_max_position: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch
    vocab_size: int
    hidden_size: int  # C
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    head_dim: int
    intermediate_size: int  # MLP width
    max_position: int  # context length the weights were trained for
    norm_eps: float
    rope: RopeConfig = RopeConfig()  # full-attention layers
    rope_local: RopeConfig | None = None  # sliding-window layers, where they have their own (Gemma 3)
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = ""  # as the checkpoint names it (config.json model_type / GGUF architecture)
    qkv_bias: bool = False  # q, k, v projections have biases
    o_bias: bool = False  # the attention output projection has a bias
    mlp_bias: bool = False  # gate, up and down have biases
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    hidden_act: str = "silu"  # of the gated MLP (ACTIVATIONS)
    sliding_window: int | None = None  # a sliding layer's query at i sees keys j with i - W < j <= i
    layer_types: tuple[LayerType, ...] = ()  # per layer; () means every layer is "full"
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    embed_scale: float = 1.0  # the embedding's rows are multiplied by this (Gemma: sqrt(hidden))
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight) (Gemma: 1)

    def __post_init__(self) -> None:
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ModelFormatError(
                f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
            )
        if self.n_layers <= 0 or self.n_heads <= 0 or self.head_dim <= 0 or self.hidden_size <= 0:
            raise ModelFormatError(
                f"n_layers={self.n_layers}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"hidden_size={self.hidden_size}: every one must be positive"
            )
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ModelFormatError(
                f"n_heads={self.n_heads} query heads do not group over n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim={self.head_dim} is odd: rotary embeddings need pairs")

    def layer_type(self, layer: int) -> LayerType:
        return self.layer_types[layer] if self.layer_types else "full"

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer (global index), None for full attention."""
        return self.sliding_window if self.layer_type(layer) == "sliding" else None

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        mt = cfg.get("model_type", "")
        reader = _HF_READERS.get(mt)
        if reader is None:
            raise ModelFormatError(
                f"model_type={mt!r} is not supported (supported: {', '.join(sorted(_HF_READERS))})"
            )
        try:
            return reader(_Keys(cfg))
        except KeyError as exc:
            raise ModelFormatError(f"config.json of a {mt} model lacks the field {exc}") from exc

    # ------------------------------------------------------------------ GGUF metadata

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
        """`fields`: the file's metadata (key -> value; tokenizer arrays may be left out)."""
        arch = fields.get("general.architecture")
        if not isinstance(arch, str) or arch not in _GGUF_READERS:
            raise ModelFormatError(
                f"GGUF general.architecture={arch!r} is not supported (supported: {', '.join(_GGUF_READERS)})"
            )
        return _GGUF_READERS[arch](_GGUFKeys(arch, fields, tensor_names))


# ---------------------------------------------------------------------------------- config.json


class _Keys:
    """config.json with the checks every reader needs: a value is read or refused by name."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.mt = cfg.get("model_type", "")

    def __getitem__(self, key: str) -> Any:
        return self.cfg[key]

    def get(self, key: str, default: Any = None) -> Any:
        v = self.cfg.get(key)
        return default if v is None else v

    def refuse_unless(self, key: str, allowed: tuple[Any, ...], why: str = "") -> None:
        v = self.cfg.get(key)
        if v not in allowed:
            raise ModelFormatError(f"{key}={v!r} is not supported for {self.mt} models{why}")

    def act(self, *keys: str, default: str = "silu") -> str:
        key = next((k for k in keys if self.cfg.get(k) is not None), keys[0])
        act = self.get(key, default)
        if act not in ACTIVATIONS:
            raise ModelFormatError(f"{key}={act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        return act

    def rope(self, params: Mapping[str, Any] | None = None, key: str = "rope_parameters") -> RopeConfig:
        """A RopeConfig from `rope_parameters` (transformers 5) or the older rope_theta + rope_scaling."""
        if params is None:
            new, old = self.cfg.get("rope_parameters"), self.cfg.get("rope_scaling")
            if new and old and (old.get("rope_type") or old.get("type")) != new.get("rope_type", "default"):
                raise ModelFormatError(  # which one a library would follow is not ours to guess
                    f"rope_scaling={old!r} disagrees with rope_parameters={new!r}: keep one of them"
                )
            params = new or old or {}
            key = "rope_parameters" if new else "rope_scaling"
        theta = float(params.get("rope_theta") or self.cfg.get("rope_theta") or 10000.0)
        return rope_from_params(params, theta, key, self.cfg.get("max_position_embeddings"))

    def partial_rotary(self) -> None:
        rope = self.cfg.get("rope_parameters") or {}
        for where, v in (
            ("partial_rotary_factor", self.cfg.get("partial_rotary_factor")),
            ("rope_parameters.partial_rotary_factor", rope.get("partial_rotary_factor")),
        ):
            if v is not None and float(v) != 1.0:
                raise ModelFormatError(f"{where}={v!r} is not supported (rotary on part of each head)")


def rope_from_params(
    params: Mapping[str, Any], theta: float, key: str, max_position: int | None = None
) -> RopeConfig:
    """One rope_parameters / rope_scaling dict (transformers' names) -> RopeConfig, or refused by name."""
    kind = params.get("rope_type") or params.get("type") or "default"
    known = {
        "default": set(),
        "linear": {"factor"},
        "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
        "yarn": {
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        },
    }
    if kind not in known:
        raise ModelFormatError(f"{key}.rope_type={kind!r} is not supported (supported: {', '.join(known)})")
    extra = set(params) - known[kind] - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    extra = {k for k in extra if params[k] is not None}
    if kind == "default":
        extra -= {"factor", "original_max_position_embeddings"}  # carried along, unused
    if extra:
        k = sorted(extra)[0]
        raise ModelFormatError(f"{key}.{k}={params[k]!r} is not supported with rope_type={kind!r}")
    if kind == "default":
        return RopeConfig(theta=theta)
    factor = params.get("factor")
    if kind == "yarn" and factor is None and max_position and params.get("original_max_position_embeddings"):
        factor = max_position / params["original_max_position_embeddings"]
    if factor is None or float(factor) <= 0:
        raise ModelFormatError(f"{key}.factor={factor!r}: rope_type={kind!r} needs a positive factor")
    factor = float(factor)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=factor)
    original = params.get("original_max_position_embeddings")
    if not original:
        raise ModelFormatError(f"{key}.original_max_position_embeddings={original!r}: {kind} needs it")
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=factor,
            original_max_position=int(original),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    return RopeConfig(
        theta=theta,
        kind="yarn",
        factor=factor,
        original_max_position=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    import math

    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _common(k: _Keys, arch: Arch, **kw: Any) -> ModelConfig:
    h, nh = k["hidden_size"], k["num_attention_heads"]
    fields: dict[str, Any] = {
        "arch": arch,
        "model_type": k.mt,
        "vocab_size": k["vocab_size"],
        "hidden_size": h,
        "n_layers": k["num_hidden_layers"],
        "n_heads": nh,
        "n_kv_heads": k.get("num_key_value_heads", nh),
        "head_dim": k.get("head_dim", h // nh),
        "intermediate_size": k["intermediate_size"],
        "max_position": k.get("max_position_embeddings", 2048),
        "norm_eps": k.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(k.get("tie_word_embeddings", False)),
        "bos_token_id": k.cfg.get("bos_token_id"),
        "eos_token_ids": _ids(k.cfg.get("eos_token_id")),
    }
    fields |= kw
    return ModelConfig(**fields)


def _hf_window_layers(k: _Keys, n_layers: int) -> tuple[int | None, tuple[LayerType, ...]]:
    """(window, layer types) of models with optional sliding layers (Qwen2/3: layer_types, or
    use_sliding_window + max_window_layers)."""
    window = k.cfg.get("sliding_window")
    types = k.cfg.get("layer_types")
    if types is None:
        if not k.cfg.get("use_sliding_window"):
            return None, ()
        first = int(k.get("max_window_layers", 0))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return _layer_types(k, types, window)


def _layer_types(k: _Keys, types: list[str], window: int | None) -> tuple[int | None, tuple[LayerType, ...]]:
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = next((t for t in types if t not in names), None)
    if bad is not None:
        raise ModelFormatError(f"layer_types contains {bad!r} (supported: {', '.join(names)})")
    out: tuple[LayerType, ...] = tuple(names[t] for t in types)  # type: ignore[misc]
    if "sliding" not in out:
        return None, ()
    if not window or int(window) <= 0:
        raise ModelFormatError(f"sliding_window={window!r} with sliding layers in layer_types")
    return int(window), out


def _llama(k: _Keys) -> ModelConfig:
    k.partial_rotary()
    k.refuse_unless("pretraining_tp", (None, 1))
    bias = bool(k.get("attention_bias", False))
    return _common(
        k,
        "llama",
        rope=k.rope(),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(k.get("mlp_bias", False)),
        hidden_act=k.act("hidden_act"),
    )


def _mistral(k: _Keys) -> ModelConfig:
    k.partial_rotary()
    if k.cfg.get("layer_types") is not None:
        raise ModelFormatError(f"layer_types={k.cfg['layer_types']!r} is not supported for mistral models")
    window = k.cfg.get("sliding_window")
    n = k["num_hidden_layers"]
    return _common(
        k,
        "llama",
        rope=k.rope(),
        hidden_act=k.act("hidden_act"),
        sliding_window=int(window) if window else None,
        layer_types=("sliding",) * n if window else (),
    )


def _qwen(k: _Keys, qk_norm: bool) -> ModelConfig:
    k.partial_rotary()
    window, types = _hf_window_layers(k, k["num_hidden_layers"])
    bias = bool(k.get("attention_bias", False))
    return _common(
        k,
        "llama",
        rope=k.rope(),
        qkv_bias=True if not qk_norm else bias,  # Qwen2 always has q/k/v biases; Qwen3 as configured
        o_bias=False if not qk_norm else bias,
        qk_norm=qk_norm,
        hidden_act=k.act("hidden_act"),
        sliding_window=window,
        layer_types=types,
    )


def _phi3(k: _Keys) -> ModelConfig:
    k.partial_rotary()
    window = k.cfg.get("sliding_window")
    n = k["num_hidden_layers"]
    return _common(
        k,
        "phi3",
        rope=k.rope(),
        hidden_act=k.act("hidden_act"),
        norm_eps=k.get("rms_norm_eps", 1e-5),
        sliding_window=int(window) if window else None,
        layer_types=("sliding",) * n if window else (),
    )


def _gemma3(k: _Keys) -> ModelConfig:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        k.refuse_unless(key, (None,), " (logit soft-capping is not implemented)")
    k.refuse_unless("use_bidirectional_attention", (None, False))
    k.partial_rotary()
    n = k["num_hidden_layers"]
    types = k.cfg.get("layer_types")
    if types is None:
        pattern = int(k.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    window, layer_types = _layer_types(k, types, k.cfg.get("sliding_window"))
    params = k.cfg.get("rope_parameters")
    if params and {"full_attention", "sliding_attention"} & set(params):
        full = k.rope(params.get("full_attention") or {}, "rope_parameters.full_attention")
        local = k.rope(params.get("sliding_attention") or {}, "rope_parameters.sliding_attention")
        full = dataclasses.replace(
            full, theta=float((params.get("full_attention") or {}).get("rope_theta", 1e6))
        )
        local = dataclasses.replace(
            local, theta=float((params.get("sliding_attention") or {}).get("rope_theta", 1e4))
        )
    else:  # older configs: rope_theta + rope_scaling for the global layers, rope_local_base_freq
        full = k.rope(k.cfg.get("rope_scaling") or {}, "rope_scaling")
        full = dataclasses.replace(full, theta=float(k.get("rope_theta", 1e6)))
        local = RopeConfig(theta=float(k.get("rope_local_base_freq", 1e4)))
    h = k["hidden_size"]
    bias = bool(k.get("attention_bias", False))
    return _common(
        k,
        "gemma3",
        head_dim=k.get("head_dim", 256),
        rope=full,
        rope_local=local,
        tie_word_embeddings=bool(k.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        hidden_act=k.act("hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
        sliding_window=window,
        layer_types=layer_types,
        attn_scale=float(k.get("query_pre_attn_scalar", 256)) ** -0.5,
        embed_scale=h**0.5,
        norm_offset=1.0,
    )


def _gpt2(k: _Keys) -> ModelConfig:
    k.act("activation_function", default="gelu_new")
    for key, ok in (
        ("scale_attn_weights", (None, True)),
        ("scale_attn_by_inverse_layer_idx", (None, False)),
        ("reorder_and_upcast_attn", (None, False)),
        ("add_cross_attention", (None, False)),
    ):
        k.refuse_unless(key, ok)
    h, nh = k["n_embd"], k["n_head"]
    return ModelConfig(
        arch="gpt2",
        model_type="gpt2",
        vocab_size=k["vocab_size"],
        hidden_size=h,
        n_layers=k["n_layer"],
        n_heads=nh,
        n_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=k.get("n_inner", 4 * h),
        max_position=k["n_positions"],
        norm_eps=k.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=True,
        bos_token_id=k.cfg.get("bos_token_id"),
        eos_token_ids=_ids(k.cfg.get("eos_token_id")),
        hidden_act="gelu_new",
    )


_HF_READERS = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": lambda k: _qwen(k, qk_norm=False),
    "qwen3": lambda k: _qwen(k, qk_norm=True),
    "phi3": _phi3,
    "gemma3_text": _gemma3,
    "gpt2": _gpt2,
}


# ---------------------------------------------------------------------------------- GGUF

# `{arch}.` keys we read (or that do not change the math); any other `{arch}.` key is refused.
_GGUF_KNOWN = {
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "rope.freq_base",
    "rope.freq_base_swa",
    "attention.sliding_window_pattern",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.linear",
    "rope.scaling.original_context_length",
    "rope.scaling.attn_factor",
    "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
    "rope.scaling.finetuned",
    "vocab_size",
}
# keys that may appear with a value that needs no code: key -> accepted values
_GGUF_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "expert_count": (0,),
    "expert_used_count": (0,),
    "attention.causal": (True,),
    "rope.scaling.yarn_log_multiplier": (0, 0.0),
    "attention.logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
}


# llama.cpp's Gemma 3 settings for what a GGUF does not say (llama-model.cpp, LLM_ARCH_GEMMA3).
GEMMA3_GLOBAL_EVERY = 6  # set_swa_pattern(6): layers 6, 12, ... attend globally, the others in the window
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # rope_freq_base_train_swa: the sliding layers' rope base
# A GGUF has no query_pre_attn_scalar (the softmax scale is its -1/2 power). llama.cpp takes it to be
# head_dim, which it is for Gemma 3 270M/1B/4B/12B (256), except for the 27B model, which llama.cpp
# recognises by its layer count alone: there it is hidden / heads (5376 / 32 = 168; head_dim is 128).
GEMMA3_27B_LAYERS = 62


class _GGUFKeys:
    """A GGUF header's metadata with the checks every reader needs: an `{arch}.` key we neither read
    nor know to be neutral is refused, and so is a missing key that has no default."""

    def __init__(self, arch: str, fields: Mapping[str, Any], tensor_names: set[str]) -> None:
        self.arch, self.f, self.names, self.p = arch, fields, tensor_names, arch + "."
        for key, value in fields.items():
            if not key.startswith(self.p):
                continue
            sub = key[len(self.p) :]
            if sub in _GGUF_KNOWN or (sub in _GGUF_NEUTRAL and value in _GGUF_NEUTRAL[sub]):
                continue
            raise ModelFormatError(f"GGUF {key}={value!r} is not supported")
        self.hidden = int(self.get("embedding_length"))
        self.n_heads = int(self.get("attention.head_count"))
        self.n_layers = int(self.get("block_count"))

    def get(self, sub: str, default: Any = ModelFormatError) -> Any:
        """`{arch}.{sub}`, or `default`; refused by name when absent without one."""
        v = self.f.get(self.p + sub)
        if v is None:
            if default is ModelFormatError:
                raise ModelFormatError(f"GGUF metadata lacks {self.p + sub}")
            return default
        return v

    def common(self) -> dict[str, Any]:
        """The ModelConfig fields every architecture reads alike."""
        return {
            "model_type": self.arch,
            "hidden_size": self.hidden,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "tie_word_embeddings": "output.weight" not in self.names,
            "bos_token_id": self.f.get("tokenizer.ggml.bos_token_id"),
            "eos_token_ids": _ids(self.f.get("tokenizer.ggml.eos_token_id")),
        }


def _gguf_gpt2(g: _GGUFKeys) -> ModelConfig:
    h, nh = g.hidden, g.n_heads
    return ModelConfig(
        arch="gpt2",
        vocab_size=-1,
        n_kv_heads=nh,
        head_dim=h // nh,
        intermediate_size=int(g.get("feed_forward_length", 4 * h)),
        max_position=int(g.get("context_length")),
        norm_eps=float(g.get("attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu_new",
        **g.common(),
    )


@dataclass(frozen=True)
class _GGUFRotary:
    """What the rotary-attention architectures (all but GPT-2) read alike, checked."""

    head_dim: int
    rope: RopeConfig
    window: int | None  # attention.sliding_window (None or 0: no sliding layers)
    layer_types: tuple[LayerType, ...] | None  # from attention.sliding_window_pattern, where given
    local_theta: float | None  # rope.freq_base_swa: the sliding layers' rope base, where given


def _gguf_rotary(g: _GGUFKeys) -> _GGUFRotary:
    head_dim = int(g.get("attention.key_length", g.get("rope.dimension_count", g.hidden // g.n_heads)))
    if int(g.get("attention.value_length", head_dim)) != head_dim:
        raise ModelFormatError(
            f"GGUF {g.p}attention.value_length={g.get('attention.value_length')} != key_length {head_dim}"
        )
    rot = int(g.get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ModelFormatError(
            f"GGUF {g.p}rope.dimension_count={rot} is not supported (rotary on part of each head of {head_dim})"
        )
    rope = _gguf_rope(g, float(g.get("rope.freq_base", 10000.0)))
    for t in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if t in g.names:
            raise ModelFormatError(f"GGUF tensor {t} (LongRoPE scaling) is not supported")
    window = g.get("attention.sliding_window", None)
    pattern = g.get("attention.sliding_window_pattern", None)
    if pattern is not None and not window:
        raise ModelFormatError(
            f"GGUF {g.p}attention.sliding_window_pattern={pattern!r} without a sliding window"
        )
    local_theta = g.get("rope.freq_base_swa", None)
    if local_theta is not None and not window:
        raise ModelFormatError(f"GGUF {g.p}rope.freq_base_swa={local_theta!r} without a sliding window")
    types: tuple[LayerType, ...] | None = None
    if isinstance(pattern, list):  # per layer: true = sliding
        if len(pattern) != g.n_layers:
            raise ModelFormatError(
                f"GGUF {g.p}attention.sliding_window_pattern has {len(pattern)} entries for {g.n_layers} layers"
            )
        types = tuple("sliding" if b else "full" for b in pattern)
    elif pattern is not None:  # every pattern-th layer is global (llama.cpp's swa pattern)
        types = _every_nth_global(g.n_layers, int(pattern))
    return _GGUFRotary(head_dim, rope, window, types, local_theta)


def _every_nth_global(n_layers: int, n: int) -> tuple[LayerType, ...]:
    return tuple("sliding" if (i + 1) % n else "full" for i in range(n_layers))


def _gguf_rotary_config(g: _GGUFKeys, r: _GGUFRotary, arch: Arch, **kw: Any) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        vocab_size=int(g.get("vocab_size", -1)),
        n_kv_heads=int(g.get("attention.head_count_kv", g.n_heads)),
        head_dim=r.head_dim,
        intermediate_size=int(g.get("feed_forward_length")),
        max_position=int(g.get("context_length", 2048)),
        norm_eps=float(g.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope=r.rope,
        **g.common(),
        **kw,
    )


def _gguf_llama_family(g: _GGUFKeys, arch: Arch, **kw: Any) -> ModelConfig:
    """llama.py's block (and phi3's): with a window, every layer slides unless the file's pattern
    says which, on its own rope base where the file gives one."""
    r = _gguf_rotary(g)
    if r.window:
        kw |= {"sliding_window": int(r.window), "layer_types": r.layer_types or ("sliding",) * g.n_layers}
        if r.local_theta is not None:
            kw["rope_local"] = RopeConfig(theta=float(r.local_theta))
    return _gguf_rotary_config(g, r, arch, **kw)


def _gguf_gemma3(g: _GGUFKeys) -> ModelConfig:
    r = _gguf_rotary(g)
    kw: dict[str, Any] = {}
    if r.window:
        kw["layer_types"] = r.layer_types or _every_nth_global(g.n_layers, GEMMA3_GLOBAL_EVERY)
        kw["sliding_window"] = int(r.window)
    scalar = g.hidden // g.n_heads if g.n_layers == GEMMA3_27B_LAYERS else r.head_dim
    return _gguf_rotary_config(
        g,
        r,
        "gemma3",
        **kw,
        rope_local=RopeConfig(theta=float(r.local_theta or GEMMA3_LOCAL_ROPE_BASE)),
        qk_norm=True,
        hidden_act="gelu_pytorch_tanh",
        attn_scale=scalar**-0.5,
        embed_scale=g.hidden**0.5,
        norm_offset=1.0,
    )


def _gguf_biases_found(g: _GGUFKeys) -> dict[str, bool]:
    """llama.cpp's llama graph adds the biases it finds (layer 0 stands for all)."""
    return {
        "qkv_bias": "blk.0.attn_q.bias" in g.names,
        "o_bias": "blk.0.attn_output.bias" in g.names,
        "mlp_bias": "blk.0.ffn_up.bias" in g.names,
    }


# GGUF general.architecture -> its reader (llama.cpp's names: Mistral is "llama")
_GGUF_READERS: dict[str, Callable[[_GGUFKeys], ModelConfig]] = {
    "llama": lambda g: _gguf_llama_family(g, "llama", **_gguf_biases_found(g)),
    "qwen2": lambda g: _gguf_llama_family(g, "llama", qkv_bias=True),
    "qwen3": lambda g: _gguf_llama_family(g, "llama", qk_norm=True),
    "phi3": lambda g: _gguf_llama_family(g, "phi3"),
    "gemma3": _gguf_gemma3,
    "gpt2": _gguf_gpt2,
}


def _gguf_rope(g: _GGUFKeys, theta: float) -> RopeConfig:
    p, get = g.p, g.get
    kind = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", None)
    if kind is None and get("rope.scaling.linear", None) is not None:
        kind, factor = "linear", get("rope.scaling.linear")
    if kind in (None, "none"):
        return RopeConfig(theta=theta)
    if kind == "linear":
        return rope_from_params({"rope_type": "linear", "factor": factor}, theta, p + "rope.scaling")
    if kind == "yarn":
        factor = float(factor) if factor else 0.0
        return rope_from_params(
            {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": get("rope.scaling.original_context_length", None),
                "beta_fast": get("rope.scaling.yarn_beta_fast", None),
                "beta_slow": get("rope.scaling.yarn_beta_slow", None),
                "attention_factor": float(get("rope.scaling.attn_factor", 1.0)) * yarn_mscale(factor),
            },
            theta,
            p + "rope.scaling",
        )
    raise ModelFormatError(
        f"GGUF {p}rope.scaling.type={kind!r} is not supported (supported: none, linear, yarn)"
    )


def _ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, list | tuple) else (int(v),)

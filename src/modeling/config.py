"""Architecture hyper-parameters and the pipeline stage type (`Shard`).

`ModelConfig` is read from a GGUF header or a Hugging Face config.json by the loader; `Shard` is
the half-open layer range one node owns, used the same way by config, proto, node and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeserve.common.errors import ModelFormatError

Arch = Literal["llama", "gpt2"]


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
    rope_theta: float = 10000.0  # llama only
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        mt = cfg.get("model_type", "")
        try:
            if mt in ("llama", "mistral"):
                if cfg.get("rope_scaling"):
                    raise ModelFormatError(f"rope_scaling={cfg['rope_scaling']!r} is not supported yet")
                h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
                return cls(
                    arch="llama",
                    vocab_size=cfg["vocab_size"],
                    hidden_size=h,
                    n_layers=cfg["num_hidden_layers"],
                    n_heads=nh,
                    n_kv_heads=cfg.get("num_key_value_heads") or nh,
                    head_dim=cfg.get("head_dim") or h // nh,
                    intermediate_size=cfg["intermediate_size"],
                    max_position=cfg.get("max_position_embeddings", 2048),
                    norm_eps=cfg.get("rms_norm_eps", 1e-6),
                    rope_theta=float(
                        cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
                    ),
                    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                    bos_token_id=cfg.get("bos_token_id"),
                    eos_token_ids=_ids(cfg.get("eos_token_id")),
                )
            if mt == "gpt2":
                h, nh = cfg["n_embd"], cfg["n_head"]
                return cls(
                    arch="gpt2",
                    vocab_size=cfg["vocab_size"],
                    hidden_size=h,
                    n_layers=cfg["n_layer"],
                    n_heads=nh,
                    n_kv_heads=nh,
                    head_dim=h // nh,
                    intermediate_size=cfg.get("n_inner") or 4 * h,
                    max_position=cfg["n_positions"],
                    norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                    tie_word_embeddings=True,
                    bos_token_id=cfg.get("bos_token_id"),
                    eos_token_ids=_ids(cfg.get("eos_token_id")),
                )
        except KeyError as exc:
            raise ModelFormatError(f"config.json of a {mt} model lacks the field {exc}") from exc
        raise ModelFormatError(f"model_type={mt!r} is not supported (supported: llama, mistral, gpt2)")

    @classmethod
    def from_gguf_fields(cls, get: Any) -> ModelConfig:
        """`get(key, default)` reads a GGUF metadata value."""
        arch = get("general.architecture", None)
        if arch != "llama":
            raise ModelFormatError(f"GGUF general.architecture={arch!r} is not supported (supported: llama)")
        h, nh = int(get("llama.embedding_length")), int(get("llama.attention.head_count"))
        n_vocab = get("llama.vocab_size", None)
        eos = get("tokenizer.ggml.eos_token_id", None)
        return cls(
            arch="llama",
            vocab_size=int(n_vocab) if n_vocab is not None else -1,
            hidden_size=h,
            n_layers=int(get("llama.block_count")),
            n_heads=nh,
            n_kv_heads=int(get("llama.attention.head_count_kv", nh)),
            head_dim=int(get("llama.rope.dimension_count", h // nh)),
            intermediate_size=int(get("llama.feed_forward_length")),
            max_position=int(get("llama.context_length", 2048)),
            norm_eps=float(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("llama.rope.freq_base", 10000.0)),
            tie_word_embeddings=True,  # decided by the loader from the presence of output.weight
            bos_token_id=get("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=_ids(eos),
        )


def _ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, list | tuple) else (int(v),)


@dataclass(frozen=True)
class Shard:
    """A pipeline stage: layers [start_layer, end_layer) of a model with n_layers layers.

    The first stage (start_layer == 0) owns the token embedding; the last (end_layer == n_layers)
    owns the final norm and the LM head.
    """

    start_layer: int
    end_layer: int
    n_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.end_layer <= self.n_layers:
            raise ValueError(
                f"layer range [{self.start_layer}, {self.end_layer}) is not a non-empty range "
                f"inside the model's {self.n_layers} layers"
            )

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.n_layers

    @property
    def n_local(self) -> int:
        return self.end_layer - self.start_layer

    @staticmethod
    def even(n_layers: int, n_parts: int, part: int) -> Shard:
        """Part `part` of an even split; earlier parts take the remainder layers."""
        if not 0 <= part < n_parts or n_parts > n_layers:
            raise ValueError(f"part {part} of {n_parts} does not exist for a {n_layers}-layer model")
        base, extra = divmod(n_layers, n_parts)
        start = part * base + min(part, extra)
        return Shard(start, start + base + (1 if part < extra else 0), n_layers)

    @staticmethod
    def full(n_layers: int) -> Shard:
        return Shard(0, n_layers, n_layers)

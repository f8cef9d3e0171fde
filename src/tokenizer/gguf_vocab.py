"""A GGUF file's tokenizer metadata (`tokenizer.ggml.*`) -> a `Vocabulary`, tokenizing as llama.cpp does.

Byte-level BPE (`model = "gpt2"`, with llama.cpp's regex splits for `tokenizer.ggml.pre`) or a
SentencePiece-style vocabulary (`model = "llama"`: scores, byte fallback); BOS/EOS as the metadata
asks, with llama.cpp's defaults where it is silent. Called by core.py for a `.gguf` model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeserve.common.detok import PieceTable
from pipeserve.common.errors import ModelFormatError
from pipeserve.common.model_files import open_gguf
from pipeserve.tokenizer.bpe import (
    Vocabulary,
    byte_level_bpe,
    sentencepiece_bpe,
    set_bos_eos_processor,
    unique_ids,
)

log = logging.getLogger(__name__)

# The regex splits llama.cpp applies in order before byte-level BPE (llm_tokenizer_bpe in
# llama-vocab.cpp). Each split keeps the text between matches as pieces of its own.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> llama.cpp's splits for it. SmolLM2 and StarCoder split every digit on its own
# first: it matters where whitespace precedes a digit ("a  1" -> "a", "  ", "1", not "a", " ", " 1").
# "default" is llama.cpp's own default (punctuation runs, then digit runs, cut in threes), not GPT-2's.
GGUF_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(
        ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"), (_GPT2_SPLIT,)
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
        (r"\p{N}", _GPT2_SPLIT),
    ),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "smaug-bpe", "dbrx"),
        (_LLAMA3_SPLIT,),
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo", "f2llmv2"), (_QWEN2_SPLIT,)
    ),
    "qwen35": (_QWEN35_SPLIT,),
    "tekken": (_TEKKEN_SPLIT,),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2"), (_GPT4O_SPLIT,)),
}
# llama.cpp looks a whole split piece up in the vocabulary before merging it (ignore_merges), and adds
# BOS for these even when the file has no tokenizer.ggml.add_bos_token.
_GGUF_PRE_WHOLE_WORDS = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "tekken")
)
_GGUF_PRE_ADD_BOS = _GGUF_PRE_WHOLE_WORDS
_GGUF_EXTRA_EOS_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def read_gguf_vocabulary(path: Path) -> Vocabulary:
    """The tokenizer a GGUF file's metadata describes (its chat template included)."""
    reader = open_gguf(path)

    def field(key: str, default: Any = None, *, required: bool = False) -> Any:
        found = reader.fields.get(key)
        if found is None:
            if required:
                raise ModelFormatError(f"{path}: GGUF metadata has no {key!r}")
            return default
        return found.contents()

    kind = field("tokenizer.ggml.model", required=True)
    tokens: list[str] = field("tokenizer.ggml.tokens", required=True)
    token_types: list[int] = field("tokenizer.ggml.token_type", [])
    if token_types and len(token_types) != len(tokens):
        raise ModelFormatError(
            f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    piece_decoder: PieceTable | None = None
    if kind == "gpt2":
        pre = field("tokenizer.ggml.pre")
        if pre is None:
            log.warning("%s: no tokenizer.ggml.pre; splitting text as llama.cpp's 'default'", path)
            pre = "default"
        merges = field("tokenizer.ggml.merges", required=True)
        tokenizer = byte_level_bpe(
            path,
            tokens,
            token_types,
            merges,
            _pre_splits(path, pre),
            ignore_merges=pre in _GGUF_PRE_WHOLE_WORDS,
        )
        add_bos_default = pre in _GGUF_PRE_ADD_BOS
    elif kind == "llama":
        unk_id = field("tokenizer.ggml.unknown_token_id")
        tokenizer, piece_decoder = sentencepiece_bpe(
            path,
            tokens,
            token_types,
            scores=field("tokenizer.ggml.scores"),
            merges=field("tokenizer.ggml.merges"),
            unk_id=unk_id if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None,
            add_space_prefix=bool(field("tokenizer.ggml.add_space_prefix", True)),
        )
        add_bos_default = True  # llama.cpp's default for a SentencePiece vocabulary
    else:
        raise ModelFormatError(
            f"{path}: tokenizer.ggml.model={kind!r} is not supported "
            "(supported: 'gpt2', byte-level BPE; 'llama', SentencePiece-style BPE)"
        )

    bos_id, eos_ids, add_bos_eos = _special_ids(path, field, len(tokens), add_bos_default)
    set_bos_eos_processor(tokenizer, tokens, *add_bos_eos)
    return Vocabulary(
        tokenizer,
        vocab_size=len(tokens),
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        chat_template=field("tokenizer.chat_template"),
        piece_decoder=piece_decoder,
    )


def _special_ids(
    path: Path, field: Callable[..., Any], n_tokens: int, add_bos_default: bool
) -> tuple[int | None, list[int], tuple[int | None, int | None]]:
    """(BOS id, EOS ids, (the BOS and EOS that encoding adds, None where none)): the EOS ids are
    tokenizer.ggml.eos_token_id and the end-of-turn/-message ids; every id must be in the vocabulary."""
    bos_id = field("tokenizer.ggml.bos_token_id")
    eos_id = field("tokenizer.ggml.eos_token_id")
    eos_ids = unique_ids([eos_id] + [field(key) for key in _GGUF_EXTRA_EOS_KEYS])
    for token_id in [bos_id, *eos_ids]:
        if token_id is not None and not 0 <= token_id < n_tokens:
            raise ModelFormatError(f"{path}: special token id {token_id} is outside [0, {n_tokens})")
    add_bos = bool(field("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(field("tokenizer.ggml.add_eos_token", False))
    for wanted, token_id, name in ((add_bos, bos_id, "bos"), (add_eos, eos_id, "eos")):
        if wanted and token_id is None:
            raise ModelFormatError(
                f"{path}: tokenizer.ggml.add_{name}_token is true but tokenizer.ggml.{name}_token_id "
                "is not set"
            )
    return bos_id, eos_ids, (bos_id if add_bos else None, eos_id if add_eos else None)


def _pre_splits(path: Path, pre: str) -> tuple[str, ...]:
    splits = GGUF_PRE_SPLITS.get(pre)
    if splits is None:
        raise ModelFormatError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not a pre-tokenizer we know, so the text would be split "
            f"wrongly (known: {', '.join(sorted(GGUF_PRE_SPLITS))})"
        )
    return splits

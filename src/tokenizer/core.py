"""The tokenizer core: encode, decode, streaming detokenization and chat templates for one model.

Plain Python over the `tokenizers` library; `tokenizer_server.py` wraps it in gRPC and tests call it
directly. Builds from a GGUF file's metadata (byte-level BPE, or a SentencePiece-style vocabulary with
scores and byte fallback), tokenizing as llama.cpp does, or from a Hugging Face checkpoint folder
(`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from pipeserve.common.errors import ConfigError, InvalidInputError, ModelFormatError
from pipeserve.common.model_files import ModelSource, model_fingerprint, open_gguf, resolve_model

log = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type in llama.h / gguf.TokenType).
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
_TOKEN_TYPE_BYTE = 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

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
_GGUF_PRE_SPLITS: dict[str, tuple[str, ...]] = {
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
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerCore:
    """One model's tokenizer. Immutable after construction and safe to share between threads."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        model_checksum: str,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        chat_template: str | None,
        piece_decoder: _PieceDecoder | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        # SentencePiece vocabularies decode token bytes themselves (see _PieceDecoder).
        self._piece_decoder = piece_decoder
        self.model_name = model_name
        self.model_checksum = model_checksum
        self.checksum = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.special_tokens: dict[str, int] = {
            added.content: token_id
            for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items())
        }
        self._template = None if chat_template is None else _compile_chat_template(chat_template)
        # Templates refer to these by name (`{{ bos_token }}`); "" where the model has none.
        self._template_tokens = {
            "bos_token": self._token_text(bos_token_id),
            "eos_token": self._token_text(eos_token_ids[0] if eos_token_ids else None),
        }

    @classmethod
    def from_model(cls, model_name: str, chat_template: str | None = None) -> TokenizerCore:
        """The tokenizer for config's `model_name`, built once per process (see `resolve_model`).

        `chat_template` (a configured Jinja template) replaces the one the model ships, if any.
        """
        core = _load(model_name)
        return core if chat_template is None else core.with_chat_template(chat_template)

    def with_chat_template(self, chat_template: str) -> TokenizerCore:
        """A copy of this tokenizer that renders chats with `chat_template` (from config)."""
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ConfigError("tokenizer.chat_template must be a non-empty Jinja template")
        other = copy.copy(self)
        other.chat_template = chat_template
        other._template = _compile_chat_template(chat_template, configured=True)
        return other

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) stay whole.

        `add_special_tokens` adds the BOS/EOS the model's tokenizer asks for (none for SmolLM2).
        """
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 come out as U+FFFD."""
        return self._decode(self._checked_ids(ids), skip_special_tokens)

    def decode_incremental(
        self,
        ids: Sequence[int],
        prefix_offset: int,
        read_offset: int,
        skip_special_tokens: bool = True,
        *,
        final: bool = False,
    ) -> tuple[str, int, int]:
        """Stateless streaming detokenization (the TGI/vLLM scheme): `(new_text, prefix_offset, read_offset)`.

        `ids` is the request's WHOLE token list so far; the offsets index into it and come from the
        previous call. Start a stream of generated tokens with (0, 0); when `ids` also holds the prompt,
        start with (max(n_prompt - 5, 0), n_prompt) so the first token decodes with some context.
        Text is decoded from `prefix_offset` both without and with the unread tokens and only the
        difference is emitted, so a tokenizer that drops a leading space at the start of a decode
        (sentencepiece) emits no wrong space. While the text ends in U+FFFD (a UTF-8 character split
        across tokens) nothing is emitted and the offsets stay. At the end of a stream pass
        `final=True` to flush held-back bytes: the outputs then concatenate to `decode(ids)`.
        """
        if not 0 <= prefix_offset <= read_offset <= len(ids):
            raise InvalidInputError(
                f"need 0 <= prefix_offset <= read_offset <= len(ids), got prefix_offset={prefix_offset}, "
                f"read_offset={read_offset}, len(ids)={len(ids)}"
            )
        window = self._checked_ids(ids[prefix_offset:])
        prefix_text = self._decode(window[: read_offset - prefix_offset], skip_special_tokens)
        text = self._decode(window, skip_special_tokens)
        if len(text) > len(prefix_text) and (final or not text.endswith("\ufffd")):
            return text[len(prefix_text) :], read_offset, len(ids)
        return "", prefix_offset, read_offset

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template, as transformers does.

        The template runs in jinja2's immutable sandbox (it comes with the model file, so it is
        untrusted). A model without a template (a base model's GGUF) serves completions only: chats raise
        InvalidInputError (HTTP 400) unless config gives one. So does a message list the template rejects
        (`raise_exception(...)`, e.g. roles out of order).
        """
        if self._template is None:
            raise InvalidInputError(
                f"model {self.model_name!r} has no chat template, so it serves completions only; "
                "send a prompt to /v1/completions, or set tokenizer.chat_template in config.json "
                "to a Jinja chat template to serve chats"
            )
        plain = _plain_messages(messages)
        try:
            return self._template.render(
                messages=plain, add_generation_prompt=add_generation_prompt, **self._template_tokens
            )
        except jinja2.TemplateError as exc:
            raise InvalidInputError(f"chat template rejected the messages: {exc}") from exc

    def _token_text(self, token_id: int | None) -> str:
        # Decoded, not the vocabulary spelling: byte-level vocabularies spell a space as "Ġ".
        if token_id is None:
            return ""
        return self._decode([token_id], False)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self._piece_decoder is not None:
            return self._piece_decoder.decode(ids, skip_special_tokens)
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        checked = list(ids)
        # tokenizers silently drops unknown ids; an id past the vocabulary is a caller's bug.
        if checked and (min(checked) < 0 or max(checked) >= self.vocab_size):
            bad = next(i for i in checked if not 0 <= i < self.vocab_size)
            raise InvalidInputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return checked


@functools.lru_cache(maxsize=4)
def _load(model_name: str) -> TokenizerCore:
    source = resolve_model(model_name)
    core = _from_gguf(source) if source.kind == "gguf" else _from_hf_folder(source)
    log.info(
        "tokenizer for %s: %d tokens, %d special, checksum %s",
        source.name,
        core.vocab_size,
        len(core.special_tokens),
        core.checksum,
    )
    return core


# ---------------------------------------------------------------------------------------------- GGUF


def _from_gguf(source: ModelSource) -> TokenizerCore:
    reader = open_gguf(source.path)

    def field(key: str, default: Any = None, *, required: bool = False) -> Any:
        found = reader.fields.get(key)
        if found is None:
            if required:
                raise ModelFormatError(f"{source.path}: GGUF metadata has no {key!r}")
            return default
        return found.contents()

    kind = field("tokenizer.ggml.model", required=True)
    tokens: list[str] = field("tokenizer.ggml.tokens", required=True)
    token_types: list[int] = field("tokenizer.ggml.token_type", [])
    if token_types and len(token_types) != len(tokens):
        raise ModelFormatError(
            f"{source.path}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    if kind == "gpt2":
        pre = field("tokenizer.ggml.pre")
        if pre is None:
            log.warning("%s: no tokenizer.ggml.pre; splitting text as llama.cpp's 'default'", source.path)
            pre = "default"
        tokenizer = _byte_level_bpe(
            source.path, tokens, token_types, field("tokenizer.ggml.merges", required=True), pre
        )
        add_bos_default, piece_decoder = pre in _GGUF_PRE_ADD_BOS, None
    elif kind == "llama":
        unk_id = field("tokenizer.ggml.unknown_token_id")
        tokenizer, piece_decoder = _sentencepiece_bpe(
            source.path,
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
            f"{source.path}: tokenizer.ggml.model={kind!r} is not supported "
            "(supported: 'gpt2', byte-level BPE; 'llama', SentencePiece-style BPE)"
        )

    bos_id = field("tokenizer.ggml.bos_token_id")
    eos_id = field("tokenizer.ggml.eos_token_id")
    eos_ids = _unique_ids([eos_id] + [field(key) for key in _GGUF_EXTRA_EOS_KEYS])
    for token_id in [bos_id, *eos_ids]:
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ModelFormatError(
                f"{source.path}: special token id {token_id} is outside [0, {len(tokens)})"
            )
    add_bos = bool(field("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(field("tokenizer.ggml.add_eos_token", False))
    for wanted, token_id, name in ((add_bos, bos_id, "bos"), (add_eos, eos_id, "eos")):
        if wanted and token_id is None:
            raise ModelFormatError(
                f"{source.path}: tokenizer.ggml.add_{name}_token is true but tokenizer.ggml.{name}_token_id "
                "is not set"
            )
    _set_bos_eos_processor(tokenizer, tokens, bos_id if add_bos else None, eos_id if add_eos else None)
    return TokenizerCore(
        tokenizer,
        model_name=source.name,
        model_checksum=model_fingerprint(source.path),
        vocab_size=len(tokens),
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        chat_template=field("tokenizer.chat_template"),
        piece_decoder=piece_decoder,
    )


def _byte_level_bpe(
    path: Path, tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str], pre: str
) -> Tokenizer:
    """GPT-2-style BPE over bytes spelled as printable characters, after `pre`'s regex splits."""
    splits = _GGUF_PRE_SPLITS.get(pre)
    if splits is None:
        raise ModelFormatError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not a pre-tokenizer we know, so the text would be split "
            f"wrongly (known: {', '.join(sorted(_GGUF_PRE_SPLITS))})"
        )
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        # A byte-level vocabulary spells every byte as one printable character; a token written any
        # other way (a raw added token) is respelled so BPE can produce it.
        spelled = token if set(token) <= alphabet else _byte_spell(token)
        vocab.setdefault(spelled, token_id)
    if len(vocab) != len(tokens):
        log.warning("%s: %d duplicate tokens in the vocabulary", path, len(tokens) - len(vocab))
    pairs = [_checked_merge(merge, vocab, path) for merge in merges]
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=pre in _GGUF_PRE_WHOLE_WORDS)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>) must match whole and be skippable on decode; user-defined ones
    # (<think>) match whole but decode as text. One spelled outside the byte alphabet is a llama.cpp
    # mislabel, so it stays a plain token (as transformers does).
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, token_types, strict=False)
            if token_type == _TOKEN_TYPE_CONTROL and set(token) <= alphabet
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, token_type in zip(tokens, token_types, strict=False)
            if token_type == _TOKEN_TYPE_USER_DEFINED and token in vocab
        ]
    )
    return tokenizer


def _sentencepiece_bpe(
    path: Path,
    tokens: Sequence[str],
    token_types: Sequence[int],
    *,
    scores: Sequence[float] | None,
    merges: Sequence[str] | None,
    unk_id: int | None,
    add_space_prefix: bool,
) -> tuple[Tokenizer, _PieceDecoder]:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, Gemma), tokenizing as llama.cpp's SPM tokenizer.

    llama.cpp cuts the control, unknown and user-defined tokens out of the text first, prefixes each
    remaining piece with a space where `add_space_prefix` says so, writes spaces as "▁", then merges
    the adjacent pair whose union is the highest-scoring token until none is left; a character no
    token covers becomes its UTF-8 bytes (<0xNN> tokens). Here that is a BPE whose merge ranks follow
    the scores (or the file's merges), with byte fallback, over a normalizer and no pre-tokenizer.
    """
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    if len(vocab) != len(tokens):
        log.warning("%s: %d duplicate tokens in the vocabulary", path, len(tokens) - len(vocab))
    if merges:
        pairs = [_checked_merge(merge, vocab, path) for merge in merges]
    elif scores is not None and len(scores) == len(tokens):
        pairs = _merges_by_score(vocab, scores)
    else:
        found = (
            "no tokenizer.ggml.scores" if scores is None else f"{len(scores)} scores for {len(tokens)} tokens"
        )
        raise ModelFormatError(
            f"{path}: a SentencePiece vocabulary (tokenizer.ggml.model='llama') needs one score per token "
            f"or tokenizer.ggml.merges; it has {found} and no merges"
        )
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=pairs,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    escape = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), escape]) if add_space_prefix else escape
    )
    special = [
        token_id
        for token_id, token_type in enumerate(token_types)
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_UNKNOWN)
    ]
    user_defined = [
        token_id for token_id, token_type in enumerate(token_types) if token_type == _TOKEN_TYPE_USER_DEFINED
    ]
    # Each piece between these is tokenized on its own, so a user-defined "\n\n" or "   " stays whole.
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])
    return tokenizer, _PieceDecoder.build(tokens, token_types, frozenset(special), add_space_prefix)


@dataclass(frozen=True)
class _PieceDecoder:
    """Decodes SentencePiece token ids as llama.cpp does: every token's bytes ("▁" read as a space,
    <0xNN> as that byte, added tokens as written), joined, then read as UTF-8 with U+FFFD for each
    invalid or cut-off sequence. (tokenizers' ByteFallback turns every byte of a run of byte tokens into
    U+FFFD when any of them is bad, so a complete character before a cut-off one would vanish from a
    decode but not from a stream.) `strip_space` drops the space that add_space_prefix put first,
    as SentencePiece does.
    """

    pieces: tuple[bytes, ...]
    special: frozenset[int]
    strip_space: bool

    @classmethod
    def build(
        cls, tokens: Sequence[str], token_types: Sequence[int], special: frozenset[int], strip_space: bool
    ) -> _PieceDecoder:
        pieces = []
        for token_id, token in enumerate(tokens):
            token_type = token_types[token_id] if token_types else _TOKEN_TYPE_BYTE
            if token_type == _TOKEN_TYPE_BYTE and _BYTE_TOKEN.fullmatch(token):
                pieces.append(bytes([int(token[3:5], 16)]))
            elif token_id in special or token_type == _TOKEN_TYPE_USER_DEFINED:
                pieces.append(token.encode())
            else:
                pieces.append(token.replace("▁", " ").encode())
        return cls(tuple(pieces), special, strip_space)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        skip = self.special if skip_special_tokens else frozenset()
        text = b"".join(self.pieces[i] for i in ids if i not in skip).decode("utf-8", errors="replace")
        return text[1:] if self.strip_space and text.startswith(" ") else text


def _merges_by_score(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to merging by score: every split of a token into two tokens, best first.

    SentencePiece merges the adjacent pair whose union scores highest, so a pair's rank is its union's
    score; equal scores fall back to the vocabulary order (llama.cpp takes the leftmost pair instead,
    which only differs when two different tokens tie).
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, token_id in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _checked_merge(merge: str, vocab: dict[str, int], path: Path) -> tuple[str, str]:
    """A GGUF merge "left right" as a pair; tokenizers would panic on a merge outside the vocabulary."""
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise ModelFormatError(f"{path}: malformed BPE merge {merge!r} (want 'left right')")
    if left not in vocab or right not in vocab or left + right not in vocab:
        raise ModelFormatError(f"{path}: BPE merge {merge!r} joins or makes a token not in the vocabulary")
    return left, right


@functools.cache
def _byte_alphabet_map() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@functools.cache
def _byte_alphabet() -> frozenset[str]:
    return frozenset(_byte_alphabet_map().values())


def _byte_spell(token: str) -> str:
    table = _byte_alphabet_map()
    return "".join(table[b] for b in token.encode("utf-8"))


def _set_bos_eos_processor(
    tokenizer: Tokenizer, tokens: Sequence[str], bos_id: int | None, eos_id: int | None
) -> None:
    """Make `encode(add_special_tokens=True)` add the BOS/EOS that the model's metadata asks for."""
    if bos_id is None and eos_id is None:
        return
    front = [f"{tokens[bos_id]}:0"] if bos_id is not None else []
    back = [f"{tokens[eos_id]}:0"] if eos_id is not None else []
    special = [(tokens[i], i) for i in _unique_ids([bos_id, eos_id])]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=[*front, "$A:0", *back],
        pair=[*front, "$A:0", *back, *front, "$B:1", *back],
        special_tokens=special,
    )


# ----------------------------------------------------------------------------------------- HF folder


def _from_hf_folder(source: ModelSource) -> TokenizerCore:
    folder = source.path
    config = _read_json(folder / "tokenizer_config.json")
    if (folder / "tokenizer.json").is_file():
        tokenizer = _tokenizers_call(
            folder / "tokenizer.json", lambda: Tokenizer.from_file(str(folder / "tokenizer.json"))
        )
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        bpe = _tokenizers_call(
            folder / "vocab.json",
            lambda: BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")),
        )
        tokenizer = Tokenizer(bpe)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    else:
        raise ModelFormatError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")

    special_text = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
    special_map = _read_json(folder / "special_tokens_map.json")
    for name in _SPECIAL_TOKEN_NAMES:
        special_text[name] = special_text[name] or _token_content(special_map.get(name))
    if not special_text["eos_token"] and tokenizer.token_to_id("<|endoftext|>") is not None:
        # GPT-2 folders often ship no tokenizer_config; transformers' GPT2Tokenizer defaults to this.
        special_text["eos_token"] = "<|endoftext|>"
    added = [
        AddedToken(
            spec["content"],
            special=spec.get("special", True),
            normalized=spec.get("normalized", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            single_word=spec.get("single_word", False),
        )
        for spec in config.get("added_tokens_decoder", {}).values()
        if isinstance(spec, dict) and isinstance(spec.get("content"), str)
    ]
    added += [AddedToken(text, special=True, normalized=False) for text in special_text.values() if text]
    tokenizer.add_special_tokens(added)

    model_config = _read_json(folder / "config.json")
    bos_id = _token_id(tokenizer, special_text["bos_token"], model_config.get("bos_token_id"))
    eos_candidates: list[Any] = [_token_id(tokenizer, special_text["eos_token"], None)]
    generation_config = _read_json(folder / "generation_config.json")
    for extra in (generation_config.get("eos_token_id"), model_config.get("eos_token_id")):
        eos_candidates += extra if isinstance(extra, list) else [extra]
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    # config.json often keeps a base model's ids after the vocabulary changed; such an id could
    # never be decoded, so it is dropped rather than trusted.
    bos_id = next(iter(_in_vocab(folder, [bos_id], vocab_size)), None)
    eos_ids = _in_vocab(folder, eos_candidates, vocab_size)
    if not (folder / "tokenizer.json").is_file():
        # tokenizer.json carries its own post-processor; a vocab.json folder says it in the config.
        vocab = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
        tokens = [vocab.get(i, "") for i in range(max(vocab) + 1)]
        _set_bos_eos_processor(
            tokenizer,
            tokens,
            bos_id if config.get("add_bos_token") else None,
            eos_ids[0] if config.get("add_eos_token") and eos_ids else None,
        )
    return TokenizerCore(
        tokenizer,
        model_name=source.name,
        model_checksum=model_fingerprint(folder),
        vocab_size=vocab_size,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        chat_template=_hf_chat_template(folder, config),
    )


def _in_vocab(folder: Path, ids: Sequence[int | None], vocab_size: int) -> list[int]:
    """The distinct ids in `ids` that the vocabulary has; the others are logged and dropped."""
    unique = _unique_ids(ids)
    kept = [i for i in unique if 0 <= i < vocab_size]
    if len(kept) < len(unique):
        log.warning(
            "%s: ignoring token ids %s outside the vocabulary", folder, sorted(set(unique) - set(kept))
        )
    return kept


def _tokenizers_call(path: Path, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except Exception as exc:  # tokenizers raises a bare Exception for any file it cannot parse
        raise ModelFormatError(f"{path}: not a readable tokenizer file ({exc})") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_id(tokenizer: Tokenizer, text: str | None, fallback: Any) -> int | None:
    found = tokenizer.token_to_id(text) if text else None
    if found is not None:
        return found
    return fallback if isinstance(fallback, int) else None


def _hf_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """transformers keeps it in chat_template.jinja (newer) or tokenizer_config.json (older)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# --------------------------------------------------------------------------------------- templates


def _unique_ids(ids: Sequence[int | None]) -> list[int]:
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str, *, configured: bool = False) -> jinja2.Template:
    """The environment transformers gives chat templates, so templates render identically."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        if configured:
            raise ConfigError(f"tokenizer.chat_template does not compile: {exc}") from exc
        raise ModelFormatError(f"the model's chat template does not compile: {exc}") from exc


def _plain_messages(messages: Any) -> list[dict[str, str]]:
    """Copies of the messages as plain str dicts: the sandboxed template sees nothing else."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role': str, 'content': str}")
    plain = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidInputError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidInputError(f"messages[{index}].{key} must be a string")
        plain.append({str(k): str.__str__(v) for k, v in message.items() if isinstance(v, str)})
    return plain

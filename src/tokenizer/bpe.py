"""The BPE core: `tokenizers` pipelines for the two vocabulary kinds a model file can carry.

`byte_level_bpe` (GPT-2 style: bytes spelled as printable characters, after regex splits) and
`sentencepiece_bpe` (scores or merges, "▁" for spaces, byte fallback; decoded by `piece_decoder`'s table as
llama.cpp does). gguf_vocab.py feeds them a GGUF's metadata; hf.py builds from a checkpoint
folder's own files. Both return a `Vocabulary`, which `TokenizerCore` (core.py) serves.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from pipeserve.common.detok import PieceTable
from pipeserve.common.errors import ModelFormatError

log = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type in llama.h / gguf.TokenType).
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
_TOKEN_TYPE_BYTE = 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class Vocabulary:
    """A model's tokenizer as a loader built it: what `TokenizerCore` needs besides its name."""

    tokenizer: Tokenizer
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    chat_template: str | None
    piece_decoder: PieceTable | None = None  # SentencePiece vocabularies decode token bytes themselves


def byte_level_bpe(
    path: Path,
    tokens: Sequence[str],
    token_types: Sequence[int],
    merges: Sequence[str],
    splits: Sequence[str],
    ignore_merges: bool,
) -> Tokenizer:
    """GPT-2-style BPE over bytes spelled as printable characters, after the regex `splits` (each
    keeps the text between its matches as pieces of their own). `ignore_merges`: a whole split piece
    found in the vocabulary is one token before any merge (llama.cpp's Llama 3 family)."""
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
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=ignore_merges))
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


def sentencepiece_bpe(
    path: Path,
    tokens: Sequence[str],
    token_types: Sequence[int],
    *,
    scores: Sequence[float] | None,
    merges: Sequence[str] | None,
    unk_id: int | None,
    add_space_prefix: bool,
) -> tuple[Tokenizer, PieceTable]:
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
    return tokenizer, piece_decoder(tokens, token_types, frozenset(special), add_space_prefix)


def piece_decoder(
    tokens: Sequence[str], token_types: Sequence[int], special: frozenset[int], strip_space: bool
) -> PieceTable:
    """How llama.cpp decodes SentencePiece token ids: every token's bytes ("▁" read as a space,
    <0xNN> as that byte, added tokens as written), joined, then read as UTF-8 with U+FFFD for each
    invalid or cut-off sequence (common/detok.py's PieceTable, which the coordinator decodes with
    too). (tokenizers' ByteFallback turns every byte of a run of byte tokens into U+FFFD when any
    of them is bad, so a complete character before a cut-off one would vanish from a decode but not
    from a stream.) `strip_space` drops the space that add_space_prefix put first, as SentencePiece
    does. The table's checksum is left empty (TokenizerCore.piece_table names its tokenizer)."""
    pieces = []
    for token_id, token in enumerate(tokens):
        token_type = token_types[token_id] if token_types else _TOKEN_TYPE_BYTE
        if token_type == _TOKEN_TYPE_BYTE and _BYTE_TOKEN.fullmatch(token):
            pieces.append(bytes([int(token[3:5], 16)]))
        elif token_id in special or token_type == _TOKEN_TYPE_USER_DEFINED:
            pieces.append(token.encode())
        else:
            pieces.append(token.replace("▁", " ").encode())
    return PieceTable(tuple(pieces), special, strip_space, checksum="")


def byte_level_pieces(tokenizer: Tokenizer, vocab_size: int) -> tuple[bytes, ...] | None:
    """Each id's bytes as tokenizers' ByteLevel decoder makes them (a token whose characters are all
    in the byte alphabet is those bytes, any other its UTF-8), or None for another decoder."""
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    back = {c: b for b, c in _byte_alphabet_map().items()}
    pieces = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:
            return None
        spelled = [back.get(c) for c in token]
        pieces.append(token.encode() if None in spelled else bytes(spelled))  # type: ignore[arg-type]
    return tuple(pieces)


def set_bos_eos_processor(
    tokenizer: Tokenizer, tokens: Sequence[str], bos_id: int | None, eos_id: int | None
) -> None:
    """Make `encode(add_special_tokens=True)` add the BOS/EOS that the model's metadata asks for."""
    if bos_id is None and eos_id is None:
        return
    front = [f"{tokens[bos_id]}:0"] if bos_id is not None else []
    back = [f"{tokens[eos_id]}:0"] if eos_id is not None else []
    special = [(tokens[i], i) for i in unique_ids([bos_id, eos_id])]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=[*front, "$A:0", *back],
        pair=[*front, "$A:0", *back, *front, "$B:1", *back],
        special_tokens=special,
    )


def unique_ids(ids: Sequence[int | None]) -> list[int]:
    """The ints of `ids` in order, each once (None and other values dropped)."""
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


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

"""Streaming detokenization from a table of token bytes, where the coordinator streams its tokens.

A vocabulary whose decode is "join every token's bytes, then read them as UTF-8" (GPT-2-style
byte-level BPE, llama.cpp's SentencePiece decoding) can be decoded by anyone who holds each
token's bytes. The tokenizer service builds that table from its own decoder and checks it
(TokenizerCore.piece_table); the coordinator fetches it once (the tokenizer's Pieces RPC) and then
detokenizes each step's tokens in-process, as TGI's router and vLLM's front end do, instead of one
DecodeStream call per step. `PieceTable.decode_incremental` computes what
`TokenizerCore.decode_incremental` does, with the table as the decoder, so it gives the same
texts and offsets (tests/test_detok.py checks both on real vocabularies).

`decode_steps` is the DecodeStream contract for one sequence (several new ids at once, one text
per id), shared by the tokenizer's servicer and the client's in-process path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeserve.common.errors import InvalidInputError

REPLACEMENT = "\ufffd"

# (ids, prefix_offset, read_offset, skip_special_tokens, final) -> (text, prefix_offset, read_offset)
IncrementalFn = Callable[..., tuple[str, int, int]]


@dataclass(frozen=True)
class PieceTable:
    """Each token id's bytes, the ids a decode may skip, and whether a decode drops one leading
    space (SentencePiece's add_space_prefix); `checksum` names the tokenizer it came from."""

    pieces: tuple[bytes, ...]
    special: frozenset[int]
    strip_space: bool
    checksum: str

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (TokenizerCore.decode's contract)."""
        return self._text(self._bytes(ids, skip_special_tokens))

    def decode_incremental(
        self,
        ids: Sequence[int],
        prefix_offset: int,
        read_offset: int,
        skip_special_tokens: bool = True,
        *,
        final: bool = False,
    ) -> tuple[str, int, int]:
        """TokenizerCore.decode_incremental's contract and results, from the table, for any offsets
        (`incremental` with this table's decode)."""
        return incremental(
            lambda w: self.decode(w, skip_special_tokens), ids, prefix_offset, read_offset, final
        )

    def _text(self, data: bytes) -> str:
        text = data.decode("utf-8", errors="replace")
        return text[1:] if self.strip_space and text.startswith(" ") else text

    def _bytes(self, ids: Sequence[int], skip_special_tokens: bool) -> bytes:
        n = len(self.pieces)
        for i in ids:
            if not 0 <= i < n:
                raise InvalidInputError(f"token id {i} is outside the vocabulary [0, {n})")
        if skip_special_tokens and self.special:
            return b"".join(self.pieces[i] for i in ids if i not in self.special)
        return b"".join(self.pieces[i] for i in ids)


def incremental(
    decode: Callable[[Sequence[int]], str],
    ids: Sequence[int],
    prefix_offset: int,
    read_offset: int,
    final: bool,
) -> tuple[str, int, int]:
    """Stateless streaming detokenization (the TGI/vLLM scheme) over a decoder: `(new_text,
    prefix_offset, read_offset)`. The window from `prefix_offset` is decoded without and with the
    unread ids and only the difference is emitted, so a decoder that drops a leading space at the
    start of a decode (SentencePiece) emits no wrong space; while the text ends in U+FFFD (a UTF-8
    character cut across tokens) nothing is emitted and the offsets stay, unless `final`.
    TokenizerCore (with its own decoder) and PieceTable (with the table) both run this."""
    if not 0 <= prefix_offset <= read_offset <= len(ids):
        raise InvalidInputError(
            f"need 0 <= prefix_offset <= read_offset <= len(ids), got prefix_offset={prefix_offset}, "
            f"read_offset={read_offset}, len(ids)={len(ids)}"
        )
    text = decode(ids[prefix_offset:])
    prefix_text = decode(ids[prefix_offset:read_offset])
    if len(text) > len(prefix_text) and (final or not text.endswith(REPLACEMENT)):
        return text[len(prefix_text) :], read_offset, len(ids)
    return "", prefix_offset, read_offset


def decode_steps(
    fn: IncrementalFn,
    ids: Sequence[int],
    base: int,
    read_offset: int,
    steps: int,
    skip_special_tokens: bool,
    final: bool,
) -> tuple[list[str], int, int]:
    """One DecodeStream item: `ids` are a sequence's generated ids from offset `base` on, its last
    `steps` ids are new; each new id is decoded as if it came alone (one text per id, joining into
    the step's text). Returns (texts, prefix_offset, read_offset), the offsets absolute."""
    ids = list(ids)
    steps = max(1, min(steps, len(ids)))
    p, r = 0, read_offset - base
    pieces = []
    for j in range(steps):
        upto = len(ids) - steps + j + 1
        text, p, r = fn(ids[:upto], p, r, skip_special_tokens, final=final and j == steps - 1)
        pieces.append(text)
    return pieces, p + base, r + base

"""The tokenizer core: encode, decode, streaming detokenization and chat rendering for one model.

Plain Python over the `tokenizers` library; `tokenizer_server.py` wraps it in gRPC and tests call it
directly. The vocabulary comes from a GGUF file's metadata (gguf_vocab.py, tokenizing as llama.cpp
does) or a Hugging Face checkpoint folder (hf.py); bpe.py builds the `tokenizers` pipelines both use,
chat.py compiles chat templates.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
from collections.abc import Sequence

import jinja2

from pipeserve.common.detok import PieceTable, incremental
from pipeserve.common.errors import ConfigError, InvalidInputError
from pipeserve.common.model_files import ModelSource, model_fingerprint, resolve_model
from pipeserve.tokenizer.bpe import Vocabulary, byte_level_pieces
from pipeserve.tokenizer.chat import compile_chat_template, plain_messages
from pipeserve.tokenizer.gguf_vocab import read_gguf_vocabulary
from pipeserve.tokenizer.hf import read_hf_vocabulary

log = logging.getLogger(__name__)


class TokenizerCore:
    """One model's tokenizer. Immutable after construction and safe to share between threads."""

    def __init__(self, vocab: Vocabulary, *, model_name: str, model_checksum: str) -> None:
        tokenizer = vocab.tokenizer
        self._tokenizer = tokenizer
        # SentencePiece vocabularies decode token bytes themselves (see bpe.piece_decoder).
        self._piece_decoder = vocab.piece_decoder
        self.model_name = model_name
        self.model_checksum = model_checksum
        self.checksum = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
        self.vocab_size = vocab.vocab_size
        self.bos_token_id = vocab.bos_token_id
        self.eos_token_ids = vocab.eos_token_ids
        self.chat_template = vocab.chat_template
        self.special_tokens: dict[str, int] = {
            added.content: token_id
            for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items())
        }
        self._template = None if self.chat_template is None else compile_chat_template(self.chat_template)
        # Templates refer to these by name (`{{ bos_token }}`); "" where the model has none.
        self._template_tokens = {
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
        }

    @classmethod
    def from_model(cls, model_name: str, chat_template: str | None = None) -> TokenizerCore:
        """The tokenizer for config's `model_name`, built once per process (see `resolve_model`).

        `chat_template` (a configured Jinja template) replaces the one the model ships, if any.
        """
        core = _load(model_name)
        return core if chat_template is None else core.with_chat_template(chat_template)

    @classmethod
    def from_source(cls, source: ModelSource) -> TokenizerCore:
        """The tokenizer of a resolved model (a GGUF file or a checkpoint folder), built anew."""
        read = read_gguf_vocabulary if source.kind == "gguf" else read_hf_vocabulary
        return cls(read(source.path), model_name=source.name, model_checksum=model_fingerprint(source.path))

    def with_chat_template(self, chat_template: str) -> TokenizerCore:
        """A copy of this tokenizer that renders chats with `chat_template` (from config)."""
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ConfigError("tokenizer.chat_template must be a non-empty Jinja template")
        other = copy.copy(self)
        other.chat_template = chat_template
        other._template = compile_chat_template(chat_template, configured=True)
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
        return incremental(
            lambda w: self._decode(self._checked_ids(w), skip_special_tokens),
            ids,
            prefix_offset,
            read_offset,
            final,
        )

    @functools.cached_property
    def piece_table(self) -> PieceTable | None:
        """Each token's bytes, for decoding outside this process (common/detok.py), or None where
        this vocabulary's decode is not "join the tokens' bytes, read them as UTF-8": a checkpoint
        folder's tokenizer.json may chain any decoders. SentencePiece vocabularies decode from their
        `bpe.piece_decoder`'s table already; byte-level ones are read back from their byte alphabet as
        tokenizers' ByteLevel decoder does, and every token decoded alone, special tokens kept, must
        then give the tokenizer's own text, or there is no table (callers decode through this service)."""
        try:
            if self._piece_decoder is not None:  # the decoder is this table (nothing to check)
                return dataclasses.replace(self._piece_decoder, checksum=self.checksum)
            pieces = byte_level_pieces(self._tokenizer, self.vocab_size)
            if pieces is None:
                return None
            special = frozenset(
                i for i, added in self._tokenizer.get_added_tokens_decoder().items() if added.special
            )
            table = PieceTable(pieces, special, False, self.checksum)
            for i in range(self.vocab_size):
                if table.decode([i], False) != self._decode([i], False):
                    log.warning("token %d decodes differently from its bytes: no piece table", i)
                    return None
            return table
        except Exception:  # the service decodes as before; never fail its start-up over this
            log.exception("building the piece table failed: callers decode through the service")
            return None

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
        plain = plain_messages(messages)
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
    core = TokenizerCore.from_source(source)
    log.info(
        "tokenizer for %s: %d tokens, %d special, checksum %s",
        source.name,
        core.vocab_size,
        len(core.special_tokens),
        core.checksum,
    )
    return core

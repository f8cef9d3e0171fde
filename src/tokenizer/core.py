"""The tokenizer core: encode, decode, streaming detokenization and chat templates for one model.

Plain Python over the `tokenizers` library; `tokenizer_server.py` wraps it in gRPC and tests call it
directly. Builds from a GGUF file's metadata (byte-level BPE) or from a Hugging Face checkpoint folder
(`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from pipeserve.common.errors import InvalidInputError, ModelFormatError
from pipeserve.modeling.source import ModelSource, model_fingerprint, open_gguf, resolve_model

log = logging.getLogger(__name__)

# Used when a model ships no chat template (GPT-2 and other base models): plain "Role: text" turns,
# and the generation prompt is "Assistant:" with no trailing space, because byte-level BPE vocabularies
# spell the space as part of the next word's token (" Hello").
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# llama.cpp's token types (llama_token_type in llama.h / gguf.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# GPT-2's split; tokenizers' ByteLevel(use_regex=True) applies the same one.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the regex splits llama.cpp applies in order before byte-level BPE
# (llama-vocab.cpp). SmolLM2 and StarCoder split every digit on its own first: it matters where
# whitespace precedes a digit ("a  1" -> "a", "  ", "1", not "a", " ", " 1").
_GGUF_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), (_GPT2_SPLIT,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
        (r"\p{N}", _GPT2_SPLIT),
    ),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2_SPLIT,)),
}
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
    ) -> None:
        self._tokenizer = tokenizer
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
        self._template = _compile_chat_template(chat_template or FALLBACK_CHAT_TEMPLATE)
        # Templates refer to these by name (`{{ bos_token }}`); "" where the model has none.
        self._template_tokens = {
            "bos_token": self._token_text(bos_token_id),
            "eos_token": self._token_text(eos_token_ids[0] if eos_token_ids else None),
        }

    @classmethod
    def from_model(cls, model_name: str) -> TokenizerCore:
        """The tokenizer for config's `model_name`, built once per process (see `resolve_model`)."""
        return _load(model_name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) stay whole.

        `add_special_tokens` adds the BOS/EOS the model's tokenizer asks for (none for SmolLM2).
        """
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 come out as U+FFFD."""
        return self._tokenizer.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

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
        prefix_text = self._tokenizer.decode(
            window[: read_offset - prefix_offset], skip_special_tokens=skip_special_tokens
        )
        text = self._tokenizer.decode(window, skip_special_tokens=skip_special_tokens)
        if len(text) > len(prefix_text) and (final or not text.endswith("\ufffd")):
            return text[len(prefix_text) :], read_offset, len(ids)
        return "", prefix_offset, read_offset

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template, as transformers does.

        The template runs in jinja2's immutable sandbox (it comes with the model file, so it is
        untrusted). A model without a template gets `FALLBACK_CHAT_TEMPLATE`. A message list the template
        rejects (`raise_exception(...)`, e.g. roles out of order) raises InvalidInputError.
        """
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
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

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
    if kind != "gpt2":
        raise ModelFormatError(
            f"{source.path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = field("tokenizer.ggml.tokens", required=True)
    merges: list[str] = field("tokenizer.ggml.merges", required=True)
    token_types: list[int] = field("tokenizer.ggml.token_type", [])
    pre = field("tokenizer.ggml.pre", "default")

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        # A byte-level vocabulary spells every byte as one printable character; a token written any
        # other way (a raw added token) is respelled so BPE can produce it.
        spelled = token if set(token) <= alphabet else _byte_spell(token)
        vocab.setdefault(spelled, token_id)
    if len(vocab) != len(tokens):
        log.warning("%s: %d duplicate tokens in the vocabulary", source.path, len(tokens) - len(vocab))
    pairs = [_merge_pair(merge, source.path) for merge in merges]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False))

    splits = _GGUF_PRE_SPLITS.get(pre)
    if splits is None:
        log.warning("%s: unknown tokenizer.ggml.pre=%r, splitting text as GPT-2 does", source.path, pre)
        splits = (_GPT2_SPLIT,)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>) must match whole and be skippable on decode; user-defined ones
    # (<think>) match whole but decode as text. One spelled outside the byte alphabet is a llama.cpp
    # mislabel, so it stays a plain token (as transformers does).
    control = [
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=False)
        if token_type == _TOKEN_TYPE_CONTROL and set(token) <= alphabet
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=False)
        if token_type == _TOKEN_TYPE_USER_DEFINED and token in vocab
    ]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user_defined)

    bos_id = field("tokenizer.ggml.bos_token_id")
    eos_id = field("tokenizer.ggml.eos_token_id")
    eos_ids = _unique_ids([eos_id] + [field(key) for key in _GGUF_EXTRA_EOS_KEYS])
    for token_id in [bos_id, *eos_ids]:
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ModelFormatError(
                f"{source.path}: special token id {token_id} is outside [0, {len(tokens)})"
            )
    _set_bos_eos_processor(
        tokenizer,
        tokens,
        bos_id if field("tokenizer.ggml.add_bos_token", False) else None,
        eos_id if field("tokenizer.ggml.add_eos_token", False) else None,
    )
    return TokenizerCore(
        tokenizer,
        model_name=source.name,
        model_checksum=model_fingerprint(source.path),
        vocab_size=len(tokens),
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        chat_template=field("tokenizer.chat_template"),
    )


def _merge_pair(merge: str, path: Path) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise ModelFormatError(f"{path}: malformed BPE merge {merge!r} (want 'left right')")
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


def _compile_chat_template(source: str) -> jinja2.Template:
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

"""A Hugging Face checkpoint folder's tokenizer -> a `Vocabulary`, as transformers reads it.

`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`; special tokens from tokenizer_config.json
and special_tokens_map.json; BOS/EOS ids also from config.json and generation_config.json; the chat
template from chat_template.jinja or tokenizer_config.json. Called by core.py for a checkpoint folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from pipeserve.common.errors import ModelFormatError
from pipeserve.tokenizer.bpe import Vocabulary, set_bos_eos_processor, unique_ids

log = logging.getLogger(__name__)

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_hf_vocabulary(folder: Path) -> Vocabulary:
    """The tokenizer of the checkpoint in `folder` (its chat template included)."""
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
        set_bos_eos_processor(
            tokenizer,
            tokens,
            bos_id if config.get("add_bos_token") else None,
            eos_ids[0] if config.get("add_eos_token") and eos_ids else None,
        )
    return Vocabulary(
        tokenizer,
        vocab_size=vocab_size,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        chat_template=_chat_template(folder, config),
    )


def _in_vocab(folder: Path, ids: Sequence[int | None], vocab_size: int) -> list[int]:
    """The distinct ids in `ids` that the vocabulary has; the others are logged and dropped."""
    unique = unique_ids(ids)
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


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """transformers keeps it in chat_template.jinja (newer) or tokenizer_config.json (older)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None

"""Chat templates: Jinja compiled the way transformers compiles them, run in jinja2's immutable sandbox.

A template comes with the model file (untrusted) or from config; `TokenizerCore` (core.py) renders
conversations with it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeserve.common.errors import ConfigError, InvalidInputError, ModelFormatError


def compile_chat_template(source: str, *, configured: bool = False) -> jinja2.Template:
    """The environment transformers gives chat templates, so templates render identically.

    A template that does not compile is a ConfigError when it came from config (`configured`),
    otherwise a ModelFormatError.
    """
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


def plain_messages(messages: Any) -> list[dict[str, str]]:
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

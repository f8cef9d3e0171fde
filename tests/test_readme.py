"""The README stays short and shows the two commands first, and docs/configuration.md lists every
field of the typed config and no other (a new field without documentation fails here)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from pipeserve.common.config import Config, NodeConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CONFIG_DOC = (ROOT / "docs" / "configuration.md").read_text()


def fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += fields(ann, f"{prefix}{name}.")
        elif name != "nodes":
            out.append(prefix + name)
    return out


def field_table() -> list[str]:
    """The first column of docs/configuration.md's table of fields."""
    lines = CONFIG_DOC.splitlines()
    i = lines.index("| field | default | meaning |")
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(re.findall(r"`([^`]+)`", line.split("|")[1])[0])
    return rows


def test_readme_starts_with_the_two_commands():
    head = README[:1500]
    assert "make up" in head and "make test" in head


def test_readme_is_short():
    assert len(README.encode()) <= 12 * 1024, "the README is a front page: move detail to docs/"


def test_every_config_field_is_documented():
    real = fields(Config) + fields(NodeConfig, "nodes[].")
    listed = field_table()
    assert len(listed) == len(set(listed)), "a field is listed twice"
    missing = [f for f in real if f not in listed]
    assert not missing, f"docs/configuration.md's table of fields lacks {missing}"
    unknown = [f for f in listed if f not in real]
    assert not unknown, f"docs/configuration.md lists fields the config does not have: {unknown}"

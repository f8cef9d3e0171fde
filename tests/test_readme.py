"""The README stays true: it shows the two commands, and its config reference lists every field
of the typed config (a new field without documentation fails here)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from pipeserve.common.config import Config, NodeConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += fields(ann, f"{prefix}{name}.")
        elif name != "nodes":
            out.append(prefix + name)
    return out


def test_readme_starts_with_the_two_commands():
    head = README[:1500]
    assert "make up" in head and "make test" in head


def test_every_config_field_is_documented():
    missing = [f for f in fields(Config) + fields(NodeConfig, "nodes[].") if f"`{f}`" not in README]
    assert not missing, f"README's config reference lacks {missing}"

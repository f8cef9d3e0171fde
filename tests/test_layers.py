"""The packages depend downward only (issue 25), read from the source: every import statement,
module level or inside a function, of every module of a package.

- common (config, errors, wire forms, clients, placement arithmetic) imports none of the services
  or the engine;
- the coordinator and the API import no modeling (they never touch weights or activations);
- the scheduler and its policies import no grpc and no protobuf: steps reach the stages through a
  StagePath in domain types, and its unit suite runs over plain-Python fakes;
- the tokenizer finds model files through common, not modeling.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def imports(path: Path) -> set[str]:
    """Every module a file imports (`from pipeserve.x import y` gives pipeserve.x and pipeserve.x.y)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def package_imports(package: str) -> dict[str, set[str]]:
    return {p.name: imports(p) for p in sorted((SRC / package).glob("*.py"))}


def offending(found: dict[str, set[str]], banned: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {
        f: sorted(m for m in mods if any(m == b or m.startswith(b + ".") for b in banned))
        for f, mods in found.items()
    }
    return {f: m for f, m in bad.items() if m}


SERVICES = tuple(
    f"pipeserve.{p}" for p in ("api", "coordinator", "node", "modeling", "tokenizer", "launcher")
)


@pytest.mark.parametrize(
    ("package", "banned"),
    [
        ("common", SERVICES),
        ("coordinator", ("pipeserve.modeling", "pipeserve.node", "pipeserve.api", "pipeserve.tokenizer")),
        ("api", ("pipeserve.modeling", "pipeserve.node", "pipeserve.coordinator", "pipeserve.tokenizer")),
        ("tokenizer", ("pipeserve.modeling", "pipeserve.node", "pipeserve.coordinator", "pipeserve.api")),
        ("modeling", ("pipeserve.node", "pipeserve.coordinator", "pipeserve.api", "pipeserve.tokenizer")),
        ("node", ("pipeserve.coordinator", "pipeserve.api", "pipeserve.tokenizer")),
        ("kernels", SERVICES),
    ],
)
def test_packages_import_downward_only(package: str, banned: tuple[str, ...]) -> None:
    assert offending(package_imports(package), banned) == {}


@pytest.mark.parametrize(
    "module", ["scheduler", "stage_path", "failover", "planner", "admission", "output", "requests"]
)
def test_the_scheduler_and_its_policies_import_no_grpc_or_protobuf(module: str) -> None:
    found = {module: imports(SRC / "coordinator" / f"{module}.py")}
    assert offending(found, ("grpc", "google.protobuf", "pipeserve.proto", "grpc_status")) == {}


def test_the_kernels_take_only_the_environment_registry_from_common() -> None:
    common = {
        m for mods in package_imports("kernels").values() for m in mods if m.startswith("pipeserve.common")
    }
    assert common <= {"pipeserve.common", "pipeserve.common.env"}, common


def test_pipeserve_variables_are_read_only_through_the_registry() -> None:
    """One registry of PIPESERVE_* variables (common/env.py): no other module reads one from
    os.environ, and every name the sources mention is registered."""
    from pipeserve.common import env

    readers, names = [], set()
    for path in SRC.rglob("*.py"):
        if "frontend" in path.parts:
            continue
        text = path.read_text()
        names |= set(re.findall(r"\bPIPESERVE_[A-Z_]+\b", text))
        if path.name != "env.py" and re.search(r"(environ(\.get)?|getenv)\(?\[?\s*[\"']PIPESERVE_", text):
            readers.append(str(path.relative_to(SRC)))
    assert readers == []
    assert names - set(env.VARIABLES) == set()
    documented = (SRC.parent / "docs" / "configuration.md").read_text()
    assert [n for n in env.VARIABLES if f"`{n}`" not in documented] == []


def test_the_check_sees_function_level_imports(tmp_path: Path) -> None:
    """The reader is not blind: a lazy import inside a function counts."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipeserve.modeling.config import Shard\n    import grpc\n")
    assert {"pipeserve.modeling.config", "pipeserve.modeling.config.Shard", "grpc"} <= imports(f)

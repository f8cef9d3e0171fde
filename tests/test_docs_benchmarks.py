"""Every benchmark figure in the docs names the committed JSON file and the key it comes from, and
equals that value as printed (docs/benchmarks.md, the README's summary, any doc that cites one).

A figure is a markdown link to a bench/*.json file whose fragment says where the number is:

    [18.18](../bench/scale-lossy-int8.json#three.runs.4.summary.agg_tok_s)

The fragment is a key path (keys and list indices joined by dots; a key may hold dots itself, as
a model name does) or arithmetic over key paths and numbers with + * / (usual precedence; `*-1`
subtracts), e.g.
`#runs.2.ours.decode_b1_tok_s/runs.2.llamacpp.decode_b1_tok_s` for a ratio or
`#three.cgroups.node1.peak_bytes/1048576` for MiB. The link text is the figure as printed: the value
rounded to the text's decimals (in e-notation, the mantissa's) must print as the text. A string
value must contain the text (a quoted message), a boolean prints as yes / no.

In docs/benchmarks.md and the README's benchmark section no measured number may stand without its
link: table cells other than row labels and parameter columns, and numbers with a unit in prose.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"

# [text](path/to/bench/x.json#fragment): the text may not hold "]", the target no ")" or space
LINK = re.compile(r"\[([^\[\]\n]+)\]\(([^)\s#]+\.json)(?:#([^)\s]*))?\)")
ANY_LINK = re.compile(r"\[([^\[\]\n]*)\]\([^)\s]*\)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
PRINTED = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
OPS = {ast.Add: operator.add, ast.Mult: operator.mul, ast.Div: operator.truediv}
# a measured number in prose: digits and a unit, not inside a word (pp256, Q4_K, 1.5B)
MEASURE = re.compile(
    r"(?<![\w.\-/])\d[\d,]*(?:\.\d+)?\s?(?:tok/s|ms|µs|s|MiB|GiB|KiB|MB|GB|GB/s|GFLOP/s|GFLOP|×|x|%)(?![\w/])"
)
# table columns whose cells are settings or labels, not measurements
PARAMETER_COLUMNS = {"K", "threads", "streams", "context (tokens)", "nodes", "layers", "links", "data path"}


def relpath(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache
def tracked() -> frozenset[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--", "bench"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell which bench files are committed")
    return frozenset(out.split())


@cache
def load(path: Path) -> Any:
    return json.loads(path.read_text())


def child(node: Any, key: str) -> tuple[bool, Any]:
    if isinstance(node, dict) and key in node:
        return True, node[key]
    if isinstance(node, list) and key.isdigit() and int(key) < len(node):
        return True, node[int(key)]
    return False, None


def lookup(node: Any, path: str) -> Any:
    """The value at a dotted path; a key may itself contain dots (tries the shortest key first)."""
    found, value = child(node, path)
    if found:
        return value
    for cut in [i for i, c in enumerate(path) if c == "."]:
        found, value = child(node, path[:cut])
        if found:
            try:
                return lookup(value, path[cut + 1 :])
            except KeyError:
                continue
    raise KeyError(path)


def evaluate(data: Any, expr: str) -> Any:
    """A key path's value, or arithmetic (+ * /) over key paths and number literals."""
    terms = re.split(r"([+*/])", expr)
    if len(terms) == 1:
        return lookup(data, expr)
    env: dict[str, float] = {}
    source = []
    for i, term in enumerate(terms):
        if i % 2 or NUMBER.fullmatch(term):
            source.append(term)
        else:
            value = lookup(data, term)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{term} is {value!r}, not a number")
            env[f"v{len(env)}"] = value
            source.append(f"v{len(env) - 1}")

    def run(node: ast.expr) -> float:
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](run(node.left), run(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -run(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        raise ValueError(f"not arithmetic: {ast.dump(node)}")

    return run(ast.parse("".join(source), mode="eval").body)


def matches(value: Any, text: str) -> bool:
    """Whether `text` is `value` as printed."""
    if isinstance(value, bool):
        return text == ("yes" if value else "no")
    if isinstance(value, str):
        return text.strip("`") in value
    if not isinstance(value, (int, float)) or not PRINTED.fullmatch(text):
        return False
    t = text.replace(",", "").lstrip("+")
    if "e" in t:
        mantissa = t.split("e")[0]
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return float(f"{value:.{digits}e}") == float(t)
    digits = len(t.split(".")[1]) if "." in t else 0
    return float(f"{value:.{digits}f}") == float(t)


def docs() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def figures(doc: Path) -> list[tuple[str, str, str | None]]:
    """(text, target, fragment) of every link from `doc` to a JSON file."""
    return [(m.group(1), m.group(2), m.group(3)) for m in LINK.finditer(doc.read_text())]


def section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    nxt = re.search(rf"\n#{{1,{len(level)}}} ", text[start + 1 :])
    return text[start : start + 1 + nxt.start()] if nxt else text[start:]


def strip_links_and_code(text: str) -> str:
    """`text` without links, code and targets (a bound such as "≥ 1.2×" is not a measurement)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = ANY_LINK.sub("LINK", text)
    text = re.sub(r"`[^`\n]*`", "CODE", text)
    return re.sub(r"(?:≥|≤|target)\s*\d[\d.,]*", "BOUND", text)


def unlinked(text: str) -> list[str]:
    """Measured numbers in `text` that carry no link: table cells (but row labels and parameter
    columns) and numbers with a unit in prose."""
    problems = []
    lines = re.sub(r"```.*?```", "", text, flags=re.S).splitlines()
    header: list[str] = []
    for line in lines:
        if not line.startswith("|"):
            header = []
            bare = strip_links_and_code(line)
            problems += [f"prose: {m.group(0)!r} in {line.strip()[:90]!r}" for m in MEASURE.finditer(bare)]
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            continue
        if set(line) <= set("|-: "):
            continue
        if len(cells) != len(header):
            problems.append(
                f"table {header[0]!r}: {len(cells)} cells in a row of {len(header)}: {line[:90]!r}"
            )
            continue
        for name, cell in zip(header[1:], cells[1:], strict=True):
            if name in PARAMETER_COLUMNS or "target" in name:
                continue
            if re.search(r"\d", strip_links_and_code(cell)):
                problems.append(f"table {header[0]!r}, column {name!r}: {cell!r}")
    return problems


# ---- the tests -----------------------------------------------------------------------------------
def test_every_cited_json_is_committed() -> None:
    for doc in docs():
        for text, target, _ in figures(doc):
            path = (doc.parent / target).resolve()
            assert path.is_file(), f"{relpath(doc)}: [{text}]({target}): no such file"
            assert relpath(path) in tracked(), f"{relpath(doc)}: {relpath(path)} is not committed"


def test_every_figure_is_its_json_value() -> None:
    wrong = []
    count = 0
    for doc in docs():
        for text, target, fragment in figures(doc):
            if fragment is None:
                continue
            count += 1
            try:
                value = evaluate(load((doc.parent / target).resolve()), fragment)
            except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                wrong.append(f"{relpath(doc)}: [{text}]({target}#{fragment}): {type(e).__name__} {e}")
                continue
            if not matches(value, text):
                wrong.append(f"{relpath(doc)}: [{text}]({target}#{fragment}) is {value!r}")
    assert not wrong, "\n".join(wrong)
    assert count >= 200, f"only {count} figures found: is the link format still the one above?"


def test_benchmark_docs_have_no_figure_without_its_json() -> None:
    problems = unlinked(BENCH_DOC.read_text())
    problems += unlinked(section(README.read_text(), "## Benchmarks"))
    assert not problems, "figures without a bench/*.json link:\n" + "\n".join(problems)


def test_every_committed_json_is_cited() -> None:
    cited = {relpath((BENCH_DOC.parent / t).resolve()) for _, t, _ in figures(BENCH_DOC)}
    orphans = sorted(f for f in tracked() if f.endswith(".json") and f not in cited)
    assert not orphans, f"docs/benchmarks.md cites no figure of {orphans}: cite them or delete them"


@pytest.mark.parametrize(
    ("value", "text", "ok"),
    [
        (18.1767, "18.18", True),
        (18.1767, "18.17", False),
        (4916458112, "4,916,458,112", True),
        (1.5273e-06, "1.5e-06", True),
        (1.5273e-06, "1.6e-6", False),
        (0.9969, "0.997", True),
        (True, "yes", True),
        (False, "yes", False),
        ("UNAVAILABLE: model part 1 is unavailable", "`model part 1`", True),
        (None, "0", False),
    ],
)
def test_matches(value: Any, text: str, ok: bool) -> None:
    assert matches(value, text) is ok


def test_evaluate() -> None:
    data = {"runs": {"1": {"a": 6.0, "b": 3.0}}, "models": {"qwen2.5-1.5b": {"x": [10, 20]}}}
    assert evaluate(data, "runs.1.a/runs.1.b") == 2.0
    assert evaluate(data, "runs.1.a+runs.1.b*2") == 12.0
    assert evaluate(data, "models.qwen2.5-1.5b.x.1/1e1") == 2.0
    assert evaluate(data, "runs.1.a+runs.1.b*-1") == 3.0
    with pytest.raises(KeyError):
        evaluate(data, "runs.2.a")

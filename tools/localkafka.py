"""Apache Kafka in KRaft mode on this machine, for `make run` and the tests.

The broker is Kafka's own jars from Maven Central: `deploy/local/kafka/pom.xml` names them, Maven
copies them into a cache folder once (`kafka_libs`), and each node is formatted with
`kafka.tools.StorageTool` and started as `java ... kafka.Kafka node.properties`, our direct child
(tools.localstack.Proc). One node is the default; three give replication factor 3 with
`min.insync.replicas=2`, as production runs.

Measured on the 2-core dev machine (Kafka 4.1.0, OpenJDK 17): the jars resolve in ~10 s on a warm
Maven cache (43 MB); a format takes ~2 s (a JVM start); a node is ready ~3 s after its start
with ~230 MB RSS (heap 512 MB max).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.localstack import (
    LOCALHOST,
    LocalStackError,
    Proc,
    apt_install,
    find_binary,
    log_tail,
    require_port_free,
    start_process,
    wait_until,
)

KAFKA_DIR = Path(__file__).resolve().parent.parent / "deploy" / "local" / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J = KAFKA_DIR / "log4j2.yaml"
# Debian packages giving the JVM and Maven when they are missing.
JAVA_PACKAGES = {"java": "default-jre-headless", "mvn": "maven"}
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies"
READY_LINE = "Kafka Server started"
JVM_FLAGS = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
             "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true")


def default_cache() -> Path:
    """Where downloaded tools are kept between runs (never in the repository)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "roomcast"


def kafka_version(pom: Path = POM) -> str:
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if found is None:
        raise LocalStackError(f"{pom} names no <kafka.version>")
    return found.group(1).strip()


def _require_java_tools(log_dir: Path | None) -> None:
    missing = [pkg for binary, pkg in JAVA_PACKAGES.items() if find_binary(binary) is None]
    if missing and not apt_install(missing, log_dir):
        raise LocalStackError(f"{' and '.join(missing)} missing: install with `apt-get install -y {' '.join(missing)}`")


def kafka_libs(cache: Path | None = None, log_dir: Path | None = None) -> Path:
    """The folder of the broker's jars, resolved from Maven Central on first use.

    Keyed by the POM's content, so a changed version or dependency resolves anew; a lock keeps two
    processes (two test sessions) from resolving into the same folder at once."""
    pom_hash = hashlib.sha256(POM.read_bytes()).hexdigest()[:10]
    folder = (cache or default_cache()) / f"kafka-{kafka_version()}-{pom_hash}"
    libs = folder / "libs"
    if (folder / "complete").exists():
        return libs
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "complete").exists():
            return libs
        _require_java_tools(log_dir)
        staging = folder / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        argv = ["mvn", "-q", "-B", "-f", str(POM), DEPENDENCY_PLUGIN, "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}"]
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        if out.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            raise LocalStackError(f"resolving Kafka's jars failed (code {out.returncode}): {' '.join(argv)}\n"
                                  + "\n".join((out.stdout + out.stderr).splitlines()[-20:]))
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        (folder / "complete").write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return libs


def new_cluster_id() -> str:
    """A KRaft cluster id as `StorageTool random-uuid` makes one (without starting a JVM)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's Uuid.randomUuid avoids these too (they look like flags)
            return text


@dataclass(frozen=True)
class KafkaNode:
    node_id: int
    port: int  # clients and replication (PLAINTEXT)
    controller_port: int
    data_dir: Path
    host: str = LOCALHOST
    netns: str | None = None  # started inside this network namespace (fault tests cut it off)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def broker_properties(node: KafkaNode, nodes: list[KafkaNode], extra: Mapping[str, str] = {}) -> dict[str, str]:
    """node.properties for one combined broker + controller of a static KRaft quorum of `nodes`.

    Replication follows the node count: three or more give RF 3, min ISR 2 and no unclean leader
    election, so an acknowledged record (acks=all) is on two brokers before the ack."""
    rf = min(3, len(nodes))
    min_isr = min(2, rf)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in nodes),
        "listeners": f"PLAINTEXT://{node.host}:{node.port},CONTROLLER://{node.host}:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{node.address}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(node.data_dir / "data"),
        "auto.create.topics.enable": "false",  # roomcast creates its topics with their partition count
        "default.replication.factor": str(rf),
        "min.insync.replicas": str(min_isr),
        "unclean.leader.election.enable": "false",
        "offsets.topic.replication.factor": str(rf),
        "offsets.topic.num.partitions": "10",  # 50 by default: slow to create on two cores
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "group.initial.rebalance.delay.ms": "0",
        # a minimum only: lets tests use short consumer sessions (the stock minimum is 6 s)
        "group.min.session.timeout.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "log.cleaner.threads": "1",
        "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),  # 128 MiB at start by default
    }
    return {**props, **extra}


def _write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


@dataclass
class KafkaCluster:
    """One or more local Kafka nodes forming a KRaft cluster, each a Proc we own.

    `base` holds each node's properties, data and the cluster's meta (id and node addresses); a
    cluster started again on the same `base` keeps its topics and offsets."""

    nodes: list[KafkaNode]
    base: Path
    log_dir: Path
    heap: str = "512m"
    extra: dict[str, str] = field(default_factory=dict)
    libs: Path | None = None
    procs: dict[int, Proc] = field(default_factory=dict)

    @classmethod
    def local(cls, base: Path, log_dir: Path, ports: list[tuple[int, int]], **kw: object) -> KafkaCluster:
        """Nodes 1..n on 127.0.0.1 with (client port, controller port) each."""
        nodes = [KafkaNode(i, port, cport, base / f"node-{i}") for i, (port, cport) in enumerate(ports, start=1)]
        return cls(nodes, base, log_dir, **kw)  # type: ignore[arg-type]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def properties_path(self, node: KafkaNode) -> Path:
        return node.data_dir / "node.properties"

    # --- format

    def prepare(self) -> None:
        """Resolve the jars, write each node's properties, and format what is not formatted yet."""
        self.libs = self.libs or kafka_libs(log_dir=self.log_dir)
        meta_path = self.base / "cluster.json"
        meta = {"nodes": [n.address for n in self.nodes]}
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old["nodes"] != meta["nodes"]:
                raise LocalStackError(f"{self.base} holds a Kafka cluster of {old['nodes']}, not {meta['nodes']}: "
                                      f"start it as it was, or remove {self.base} to start afresh")
            cluster_id = old["cluster_id"]
        else:
            cluster_id = new_cluster_id()
        for node in self.nodes:
            _write_properties(self.properties_path(node), broker_properties(node, self.nodes, self.extra))
        formats = [self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "--ignore-formatted",
                              "-c", str(self.properties_path(n))) for n in self.nodes]
        running = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for argv in formats]
        for argv, proc in zip(formats, running, strict=True):
            output = proc.communicate(timeout=120)[0].decode("utf-8", "replace")
            if proc.returncode != 0:
                raise LocalStackError(f"formatting Kafka storage failed ({' '.join(argv)}):\n{output[-2000:]}")
        self.base.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({**meta, "cluster_id": cluster_id}))

    def _java(self, main: str, *args: str, heap: str | None = None) -> list[str]:
        assert self.libs is not None
        java = str(find_binary("java") or "java")
        memory = [f"-Xmx{heap}", "-Xms64m"] if heap else ["-Xmx256m"]
        return [java, *memory, *JVM_FLAGS, "-cp", f"{self.libs}/*", main, *args]

    # --- run

    def start(self, timeout: float = 90.0) -> KafkaCluster:
        """Format if needed, start every node that is not running, and wait until each is ready."""
        self.prepare()
        starting = [(n, self._spawn(n)) for n in self.nodes if not self.running(n.node_id)]
        try:
            for node, offset in starting:
                self._wait_ready(node, offset, timeout)
        except BaseException:
            for node, _ in starting:
                self.procs[node.node_id].stop(5)
            raise
        return self

    def start_node(self, node_id: int, timeout: float = 90.0) -> None:
        """Start one node again (after a kill or stop) on its data, and wait until it is ready."""
        node = self.node(node_id)
        offset = self._spawn(node)
        try:
            self._wait_ready(node, offset, timeout)
        except BaseException:
            self.procs[node_id].stop(5)
            raise

    def _spawn(self, node: KafkaNode) -> int:
        """Start the node's process; returns where its log stood, to find its ready line after."""
        if node.netns is None:
            require_port_free(node.port, node.controller_port, host=node.host)
        log_path = self.log_dir / f"kafka-{node.node_id}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        argv = self._java("kafka.Kafka", str(self.properties_path(node)), heap=self.heap)
        argv[1:1] = [f"-Dlog4j2.configurationFile={LOG4J}", f"-Dkafka.logs.dir={node.data_dir / 'logs'}"]
        if node.netns is not None:
            argv = ["ip", "netns", "exec", node.netns, *argv]
        self.procs[node.node_id] = start_process(f"kafka-{node.node_id}", argv, self.log_dir, stop_timeout=30.0,
                                                 ports=[node.port, node.controller_port])
        return offset

    def _wait_ready(self, node: KafkaNode, offset: int, timeout: float) -> None:
        proc = self.procs[node.node_id]

        def started() -> bool:
            with open(proc.log_path, "rb") as f:
                f.seek(offset)
                return READY_LINE.encode() in f.read()

        wait_until(started, f"Kafka node {node.node_id} ({node.address}) to start", timeout, proc, interval=0.1)

    def running(self, node_id: int) -> bool:
        proc = self.procs.get(node_id)
        return proc is not None and proc.alive

    def kill(self, node_id: int) -> None:
        """SIGKILL: no controlled shutdown, what a crash or an OOM kill does."""
        self.procs[node_id].kill()

    def stop_node(self, node_id: int) -> None:
        """SIGTERM: a controlled shutdown (leadership moves away first), as in a rolling restart."""
        self.procs[node_id].stop()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.alive:
                proc.popen.terminate()
        for proc in self.procs.values():
            proc.stop()

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        """Each node's state and its log's tail (for failure messages)."""
        return "\n".join(f"node {n.node_id} {'up' if self.running(n.node_id) else 'down'} at {n.address}:\n"
                         + log_tail(self.procs[n.node_id].log_path, 5) for n in self.nodes if n.node_id in self.procs)


def local_ports(count: int, first: int = 9092) -> list[tuple[int, int]]:
    """(client, controller) ports of `count` nodes from `first` on: 9092/9093, 9094/9095, ..."""
    return [(first + 2 * i, first + 2 * i + 1) for i in range(count)]


@contextlib.contextmanager
def running_cluster(base: Path, log_dir: Path, ports: list[tuple[int, int]], **kw: object) -> Iterator[KafkaCluster]:
    cluster = KafkaCluster.local(base, log_dir, ports, **kw)
    try:
        yield cluster.start()
    finally:
        cluster.stop()

"""Starting roomcast's own services as child processes (used by `roomcast up` and the tests)."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from shared.settings import Settings
from tools.localstack import LocalStackError, Proc, log_tail, start_process


def _start(module: str, name: str, settings: Settings, log_dir: Path, extra: dict[str, str],
           args: tuple[str, ...] = (), wrap: Sequence[str] = ()) -> Proc:
    """`wrap`: the command to run it under (the fault tests: `ip netns exec NS`)."""
    env = {**settings.to_env(), "NODE_ID": name, **extra}
    return start_process(name, [*wrap, sys.executable, "-m", module, *args], log_dir, env=env, stop_timeout=20)


def start_gateway(settings: Settings, port: int, log_dir: Path, name: str | None = None,
                  wait: bool = True, wrap: Sequence[str] = (), **extra: str) -> Proc:
    proc = _start("gateway", name or f"gateway-{port}", settings, log_dir, {"PORT": str(port), **extra}, wrap=wrap)
    proc.ports = (port,)
    if wait:
        _ready_or_stop(proc, f"http://{settings.host}:{port}/readyz")
    return proc


def start_persister(settings: Settings, log_dir: Path, name: str = "persister", metrics_port: int = 0,
                    wrap: Sequence[str] = (), **extra: str) -> Proc:
    proc = _start("persister", name, settings, log_dir, {"METRICS_PORT": str(metrics_port), **extra}, wrap=wrap)
    if metrics_port:
        proc.ports = (metrics_port,)
        _ready_or_stop(proc, f"http://{settings.host}:{metrics_port}/metrics")
    return proc


def start_sweeper(settings: Settings, log_dir: Path, name: str = "sweeper", once: bool = False,
                  metrics_port: int = 0, **extra: str) -> Proc:
    return _start("sweeper", name, settings, log_dir, {"METRICS_PORT": str(metrics_port), **extra},
                  ("--once",) if once else ())


def _ready_or_stop(proc: Proc, url: str) -> None:
    try:
        wait_http_ok(url, proc)
    except BaseException:
        proc.stop()
        raise


def wait_http_ok(url: str, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive:
            raise LocalStackError(f"{proc.name} exited ({proc.popen.returncode}):\n{log_tail(proc.log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise LocalStackError(f"{proc.name} not ready at {url} after {timeout}s:\n{log_tail(proc.log_path)}")


def scrape(url: str) -> dict[str, float]:
    """Prometheus text from `url` as {sample name with labels: value} (comments skipped)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out

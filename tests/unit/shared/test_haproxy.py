"""deploy/haproxy/haproxy.cfg: valid for HAProxy 2.6, rendered for the local run by replacing only
the lines that name places, and in step with the gateway's settings and the Kubernetes Ingress."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings
from tools import haproxy
from tools.localstack import require_binary

PRODUCTION = haproxy.CONFIG.read_text()
INGRESS = haproxy.CONFIG.parents[1] / "k8s" / "base" / "ingress.yaml"


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 0.001}[unit]


def directive(config: str, *words: str) -> list[str]:
    """The arguments of the first line starting with `words`."""
    for line in config.splitlines():
        if line.split()[:len(words)] == list(words):
            return line.split()[len(words):]
    raise AssertionError(f"no {' '.join(words)} line")


def haproxy_check(config: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    return subprocess.run([str(require_binary("haproxy")), "-c", "-f", str(path)], capture_output=True, text=True,
                          timeout=30)


def test_the_production_config_is_valid(tmp_path: Path) -> None:
    check = haproxy_check(PRODUCTION, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_rendering_replaces_the_places_and_keeps_everything_else(tmp_path: Path) -> None:
    admin = tmp_path / "admin.sock"
    local = haproxy.render(18000, [18001, 18002, 18003], admin, {"timeout tunnel": "2s"})
    check = haproxy_check(local, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert directive(local, "bind") == ["127.0.0.1:18000"]
    assert directive(local, "stats", "socket")[0] == str(admin)
    servers = [line.split()[1:3] for line in local.splitlines() if line.split()[:1] == ["server"]]
    assert servers == [["gw18001", "127.0.0.1:18001"], ["gw18002", "127.0.0.1:18002"], ["gw18003", "127.0.0.1:18003"]]
    assert directive(local, "timeout", "tunnel") == ["2s"]
    changed = {"bind", "stats", "server", "timeout tunnel"}

    def kept(config: str) -> list[str]:
        return [line for line in config.splitlines() if line.split()[:1] and line.split()[0] not in changed
                and " ".join(line.split()[:2]) not in changed]

    assert kept(local) == kept(PRODUCTION)


def test_a_config_without_a_line_the_renderer_replaces_is_refused() -> None:
    without_bind = "\n".join(line for line in PRODUCTION.splitlines() if not line.strip().startswith("bind"))
    with pytest.raises(haproxy.HaproxyError, match="bind"):
        haproxy.render(18000, [18001], Path("/tmp/x.sock"), template=without_bind)
    with pytest.raises(haproxy.HaproxyError, match="timeout nowhere"):
        haproxy.render(18000, [18001], Path("/tmp/x.sock"), {"timeout nowhere": "1s"})


def test_a_server_added_at_run_time_is_checked_like_the_others() -> None:
    args = haproxy.default_server_args(PRODUCTION)
    assert args[0] == "check" and "inter" in args and "fall" in args and "rise" in args


def test_a_draining_gateway_is_out_of_rotation_before_it_closes_its_clients() -> None:
    """HAProxy needs `fall` failed checks `inter` apart to take a gateway out: the gateway's
    DRAIN_DELAY_S must be longer, with a check interval to spare."""
    args = haproxy.default_server_args(PRODUCTION)
    inter, fall = seconds(args[args.index("inter") + 1]), int(args[args.index("fall") + 1])
    assert inter * (fall + 1) < Settings().drain_delay_s


def test_every_load_balancer_lets_a_pinged_websocket_live_and_cuts_a_silent_one() -> None:
    """The idle timeouts of HAProxy and the Ingress are one figure: at least twice the gateway's
    ping interval (a live connection is never idle that long), and minutes, not hours (a gateway
    that stopped pinging loses its clients to the others)."""
    tunnel = seconds(directive(PRODUCTION, "timeout", "tunnel")[0])
    assert 2 * Settings().ping_interval_s <= tunnel <= 300
    [ingress] = [d for d in yaml.safe_load_all(INGRESS.read_text()) if d and d["kind"] == "Ingress"]
    annotations = ingress["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[f"nginx.ingress.kubernetes.io/{key}"]) == tunnel, key
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"

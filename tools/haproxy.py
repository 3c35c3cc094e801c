"""HAProxy in front of the gateways, run as our child: the production config rendered for this
machine, the process, and its runtime API (server states, a gateway added while running).

deploy/haproxy/haproxy.cfg is used as it is, except for the lines that name places: the frontend's
`bind`, the `stats socket`, and the backend's `server` lines (one per local gateway, named by its
port). Tests may also override a directive's value (short timeouts). Why each setting is what it is:
deploy/haproxy/README.md.

HAProxy runs in the foreground (`-db`, so we own its PID); SIGTERM stops it at once, SIGUSR1 is a
soft stop: the listener closes, open connections stay until they end (bounded by hard-stop-after).
"""

from __future__ import annotations

import hashlib
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.localstack import (
    LOCALHOST,
    LocalStackError,
    Proc,
    port_open,
    require_binary,
    require_port_free,
    start_process,
    wait_until,
)

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "gateways"
_SUN_PATH_MAX = 100  # sun_path is 108 bytes


class HaproxyError(LocalStackError):
    """HAProxy's runtime API refused a command, or its config is not what the renderer expects."""


def server_name(port: int) -> str:
    """A local gateway's name in the backend: gw8001."""
    return f"gw{port}"


def admin_socket(folder: Path) -> Path:
    """Where the runtime API listens, for a HAProxy whose config lives in `folder`."""
    path = folder / "admin.sock"
    if len(str(path)) <= _SUN_PATH_MAX:
        return path
    return Path(f"/tmp/roomcast-haproxy-{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}.sock")


# --------------------------------------------------------------------------- config


def render(port: int, gateway_ports: Sequence[int], admin: Path, overrides: Mapping[str, str] = {},
           template: str | None = None) -> str:
    """The production config for HAProxy on 127.0.0.1:`port` in front of gateways on
    127.0.0.1:`gateway_ports`, its runtime API on the Unix socket `admin`. `overrides` set a
    directive's value by name, e.g. {"timeout tunnel": "2s"}; each must be in the config."""
    text = CONFIG.read_text() if template is None else template
    out: list[str] = []
    section = ""
    done: set[str] = set()
    for line in text.splitlines():
        words = line.split()
        if line[:1].isalpha():
            section = " ".join(words[:2])
        key = next((k for k in overrides if words[:len(k.split())] == k.split()), None)
        if key is not None:
            line, done = f"    {key} {overrides[key]}", done | {key}
        elif section.startswith("frontend") and words[:1] == ["bind"]:
            line, done = f"    bind {LOCALHOST}:{port}", done | {"bind"}
        elif section == "global" and words[:2] == ["stats", "socket"]:
            line, done = f"    stats socket {admin} mode 600 level admin", done | {"stats socket"}
        elif section == f"backend {BACKEND}" and words[:1] == ["server"]:
            if "server" in done:
                continue
            line, done = "\n".join(server_line(p) for p in gateway_ports), done | {"server"}
        out.append(line)
    missing = {"bind", "stats socket", "server", *overrides} - done
    if missing:
        raise HaproxyError(f"{CONFIG} has no {', '.join(sorted(missing))} line where the renderer expects one")
    return "\n".join(out) + "\n"


def server_line(port: int) -> str:
    return f"    server {server_name(port)} {LOCALHOST}:{port}"


def default_server_args(config: str) -> list[str]:
    """The backend's `default-server` settings: a server added at run time gets none of them
    unless they are given again (HAProxy's `add server`)."""
    section = ""
    for line in config.splitlines():
        words = line.split()
        if line[:1].isalpha():
            section = " ".join(words[:2])
        if section == f"backend {BACKEND}" and words[:1] == ["default-server"]:
            return words[1:]
    return []


# --------------------------------------------------------------------------- process


def start_haproxy(config: Path, port: int, admin: Path, log_dir: Path, name: str = "haproxy",
                  timeout: float = 15.0) -> Proc:
    """HAProxy with `config` (rendered for `port` and `admin`), in the foreground; returns once it
    accepts connections and its runtime API answers."""
    require_port_free(port)
    admin.unlink(missing_ok=True)  # a socket left by a HAProxy that was killed
    proc = start_process(name, [str(require_binary("haproxy")), "-db", "-f", str(config)], log_dir,
                         stop_timeout=35.0, ports=[port])
    try:
        wait_until(lambda: port_open(LOCALHOST, port) and bool(command(admin, "show info")),
                   f"HAProxy on {port} and its runtime API", timeout, proc)
    except BaseException:
        proc.stop(5)
        raise
    return proc


def soft_stop(proc: Proc) -> None:
    """Close the listener now; HAProxy exits once its open connections have ended."""
    if proc.alive:
        proc.popen.send_signal(signal.SIGUSR1)


# --------------------------------------------------------------------------- runtime API


def command(admin: Path, line: str, timeout: float = 5.0) -> str:
    """One command on the runtime API; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(admin))
        s.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


@dataclass(frozen=True)
class ServerStat:
    name: str
    address: str
    status: str  # UP, DOWN, MAINT, or a transition such as "UP 1/2" (going down) or "DOWN 1/2"
    current: int  # sessions open now
    total: int  # sessions ever sent to it (a connect that failed and was sent elsewhere counts too)

    @property
    def in_rotation(self) -> bool:
        """New connections may go to it (UP, or UP but going down)."""
        return self.status.startswith("UP")


def servers(admin: Path) -> dict[str, ServerStat]:
    """The backend's servers by name, from `show stat`."""
    lines = command(admin, f"show stat {BACKEND} 4 -1").splitlines()
    header = lines[0].lstrip("# ").split(",") if lines else []
    out = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        row = dict(zip(header, line.split(","), strict=False))
        out[row["svname"]] = ServerStat(row["svname"], row.get("addr", ""), row["status"], int(row["scur"] or 0),
                                        int(row["stot"] or 0))
    return out


def add_server(admin: Path, port: int, args: Sequence[str]) -> None:
    """Put a gateway on 127.0.0.1:`port` into the backend, checked like the others (`args`: the
    config's default-server settings). HAProxy sends it clients once its checks pass."""
    name = f"{BACKEND}/{server_name(port)}"
    answer = command(admin, f"add server {name} {LOCALHOST}:{port} {' '.join(args)}")
    if "New server registered" not in answer:
        raise HaproxyError(f"HAProxy refused `add server {name}`: {answer.strip()}")
    for step in ("enable health", "enable server"):
        if answer := command(admin, f"{step} {name}").strip():
            raise HaproxyError(f"HAProxy refused `{step} {name}`: {answer}")

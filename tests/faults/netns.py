"""Test hosts in network namespaces of our own, on a bridge of our own: a process started in one can
be cut off from everything (its link down: packets dropped, no reset, like a real partition) and
joined again. The root namespace reaches each host at its address through the bridge.

Names carry our PID (`rcf<pid>...`, under the kernel's 15-character limit), so a session killed
before its cleanup leaves names the next session recognises as stale and removes."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass, field

PREFIX = "rcf"


def ip(*args: str, check: bool = True) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Namespaces and links of sessions that died without cleaning up."""
    names = set(re.findall(rf"\b({PREFIX}\d+[a-z]\d*)\b", ip("netns", "list") + ip("-o", "link", "show")))
    for name in sorted(names):
        pid = int(re.match(rf"{PREFIX}(\d+)", name).group(1))  # type: ignore[union-attr]
        if _pid_alive(pid):
            continue
        if name in ip("netns", "list"):
            ip("netns", "del", name, check=False)
        else:
            ip("link", "del", name, check=False)


def _free_subnet() -> str:
    used = ip("-o", "-4", "addr", "show")
    for third in range(10, 250):
        if f"10.251.{third}." not in used:
            return f"10.251.{third}"
    raise RuntimeError("no free 10.251.x.0/24 subnet for test hosts")


@dataclass
class HostNet:
    """A bridge (the root namespace's side at .1) and hosts .11, .12, ... each in its namespace."""

    hosts: int
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    subnet: str = field(default_factory=_free_subnet)

    @property
    def bridge(self) -> str:
        return f"{self.tag}b"

    def namespace(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def link(self, i: int) -> str:
        return f"{self.tag}v{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    @property
    def bridge_address(self) -> str:
        """The root namespace on the bridge: what a host reaches the machine's own services through."""
        return f"{self.subnet}.1"

    def up(self) -> HostNet:
        remove_stale()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(1, self.hosts + 1):
            self._add(i)
        return self

    def _add(self, i: int) -> None:
        ns = self.namespace(i)
        ip("netns", "add", ns)
        ip("link", "add", self.link(i), "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", self.link(i), "master", self.bridge, "up")
        ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self) -> int:
        """One more host on the bridge; returns its number."""
        self.hosts += 1
        self._add(self.hosts)
        return self.hosts

    def remove_host(self, i: int) -> None:
        with contextlib.suppress(RuntimeError):
            ip("netns", "del", self.namespace(i))
        ip("link", "del", self.link(i), check=False)

    def blackhole(self, on: int, towards: int) -> None:
        """Host `on` silently drops what it sends to host `towards` (no reset, no ICMP): seen from
        `towards`, `on` has gone quiet."""
        ip("-n", self.namespace(on), "route", "add", "blackhole", f"{self.address(towards)}/32")

    def unblackhole(self, on: int, towards: int) -> None:
        ip("-n", self.namespace(on), "route", "del", "blackhole", f"{self.address(towards)}/32", check=False)

    def cut(self, i: int) -> None:
        """Host i loses the network: whatever it sends or is sent is dropped."""
        ip("link", "set", self.link(i), "down")

    def join(self, i: int) -> None:
        ip("link", "set", self.link(i), "up")

    def down(self) -> None:
        for i in range(1, self.hosts + 1):
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", self.namespace(i))
            ip("link", "del", self.link(i), check=False)
        ip("link", "del", self.bridge, check=False)

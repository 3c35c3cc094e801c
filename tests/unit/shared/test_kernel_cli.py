"""The kernel's `roomcast` command: token and migrate always; the developer's commands only where
tools/ is installed (the service image ships no tools/ and must still run `roomcast migrate`)."""

from __future__ import annotations

import argparse
import sys

import pytest

from shared.cli import build_parser


def commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_with_tools_installed_every_command_is_there() -> None:
    assert commands(build_parser()) >= {"token", "migrate", "up", "down", "check", "stats", "bench"}


def test_without_tools_the_kernel_commands_remain(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "tools" or m.startswith(("tools.", "bench"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tools", None)  # as in the image: `import tools` fails
    parser = build_parser()
    assert commands(parser) == {"token", "migrate"}
    assert parser.parse_args(["migrate"]).command == "migrate"

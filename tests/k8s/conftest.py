"""Fixtures of the API-server tests: the built binaries and a running control plane with fake nodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s.cluster import ControlPlane, Tools, ToolsError, add_fake_nodes, build_tools, control_plane
from tests.manifests import kubectl_binary

# Three nodes in three zones: the fewest on which prod's three Kafka brokers (one per node) fit.
NODES = 3


@pytest.fixture(scope="session")
def k8s_tools(log_dir: Path) -> Tools:
    try:
        return build_tools(log_dir)
    except ToolsError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def kubectl() -> str:
    try:
        return kubectl_binary()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def cp(k8s_tools: Tools, kubectl: str, tmp_path_factory: pytest.TempPathFactory,
       log_dir: Path) -> Iterator[ControlPlane]:
    with control_plane(k8s_tools, kubectl, tmp_path_factory.mktemp("k8s"), log_dir) as plane:
        add_fake_nodes(plane, NODES)
        yield plane

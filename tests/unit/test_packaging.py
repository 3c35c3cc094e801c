"""The distributions' metadata (the server's and the client library's)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.licenses import canonicalize_license_expression
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
PYPROJECTS = [ROOT / "pyproject.toml", ROOT / "client" / "pyproject.toml"]


@pytest.mark.parametrize("path", PYPROJECTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_license_is_an_spdx_string_for_a_setuptools_that_reads_it(path: Path) -> None:
    meta = tomllib.loads(path.read_text())
    license_ = meta["project"]["license"]
    # The TOML-table form ({text = ...}) is deprecated by setuptools (PEP 639).
    assert isinstance(license_, str)
    assert canonicalize_license_expression(license_) == license_
    (setuptools,) = [Requirement(r) for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert not SpecifierSet(setuptools.specifier).contains("76.9"), "SPDX strings need setuptools>=77"


def test_the_client_library_needs_none_of_the_servers_dependencies() -> None:
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert client["name"] == "roomcast-client"
    assert {Requirement(r).name for r in client["dependencies"]} == {"websockets", "orjson"}
    assert (ROOT / "client" / "roomcast_client" / "py.typed").is_file()

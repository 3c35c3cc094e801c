"""The client library as an application gets it: `pip install ./client` into a fresh venv, without
the server's dependencies, then join, send and resume against a real gateway from that venv."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import Settings
from tests.conftest import ROOT
from tests.support import Cluster, token

pytestmark = pytest.mark.timeout(300)

APP = '''
import asyncio, importlib.util, json, sys
from importlib.metadata import requires
from roomcast_client import RoomcastClient

async def main(url: str, token: str, room: str) -> None:
    async with RoomcastClient(url, token, reconnect=False) as alice:
        joined = await alice.join(room)
        ack = await alice.send(room, "one")
        echo = await asyncio.wait_for(anext(alice.messages()), 10)
        saved = alice.cursor(room)
    async with RoomcastClient(url, token, reconnect=False) as other:
        missed = await other.send(room, "two")  # while alice is away
    async with RoomcastClient(url, token, reconnect=False) as alice:
        resumed = await alice.join(room, cursor=saved)
        replayed = await asyncio.wait_for(anext(alice.messages()), 10)
    server_side = ["gateway", "shared", "starlette", "pydantic", "aiokafka", "redis", "aiomysql"]
    print(json.dumps({"joined": joined, "ack": ack, "echo": echo, "saved": saved, "missed": missed,
                      "resumed": resumed, "replayed": replayed, "requires": requires("roomcast-client"),
                      "importable": [m for m in server_side if importlib.util.find_spec(m)]}))

asyncio.run(main(*sys.argv[1:]))
'''


@pytest.fixture
def cluster(migrated: Settings, log_dir: Path) -> Iterator[Cluster]:
    c = Cluster(migrated, log_dir).start(gateways=1)
    yield c
    c.stop()


def run(*argv: str | Path, cwd: Path) -> str:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"{argv}: {r.stdout}\n{r.stderr}"
    return r.stdout


def test_the_client_installs_alone_and_joins_sends_and_resumes(cluster: Cluster, migrated: Settings,
                                                               tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", ROOT / "client", cwd=tmp_path)
    installed = {p["name"].lower() for p in json.loads(run(python, "-m", "pip", "list", "--format=json",
                                                           "--disable-pip-version-check", cwd=tmp_path))}
    assert installed - {"pip", "setuptools"} == {"roomcast-client", "websockets", "orjson"}

    (tmp_path / "app.py").write_text(APP)
    out = json.loads(run(python, "app.py", cluster.url(0), token(migrated, "alice"), "pkg", cwd=tmp_path))
    assert sorted(out["requires"]) == ["orjson>=3.10", "websockets<18,>=15"]
    assert out["importable"] == [], "none of the server's packages came along"
    assert out["joined"]["type"] == "joined"
    assert (out["echo"]["id"], out["echo"]["cmid"], out["saved"]) == (out["ack"]["id"], out["ack"]["client_msg_id"],
                                                                       out["ack"]["cursor"])
    assert out["resumed"]["recovered"] is True
    assert (out["replayed"]["id"], out["replayed"]["body"]) == (out["missed"]["id"], "two")

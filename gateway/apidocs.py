"""The API's machine-readable documents: gateway/spec/{asyncapi,openapi}.yaml, bundled for serving.

Both refer to the frames' and bodies' JSON Schemas in gateway/spec/schemas.yaml (their one
source). A served document cannot point at a file beside it, so `bundle` copies each schema it
uses into the document's `components.schemas` and points there instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

SPEC = Path(__file__).parent / "spec"
SCHEMAS_FILE = "schemas.yaml"
_EXTERNAL = f"{SCHEMAS_FILE}#/$defs/"
_INTERNAL = "#/$defs/"  # (a reference inside schemas.yaml)
_COMPONENT = "#/components/schemas/"


def load(name: str) -> dict[str, Any]:
    """One of the spec files, as written."""
    doc: dict[str, Any] = yaml.safe_load((SPEC / name).read_text())
    return doc


def bundle(doc: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """`doc` without references to schemas.yaml: each schema it uses (and the schemas those use)
    is copied into its components.schemas."""
    defs: dict[str, Any] = schemas["$defs"]
    used: dict[str, Any] = {}

    def rewrite(node: Any, prefix: str) -> Any:
        if isinstance(node, list):
            return [rewrite(item, prefix) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(prefix):
                name = value[len(prefix):]
                if name not in used:
                    used[name] = None  # (claimed before the walk: schemas may refer to each other)
                    used[name] = rewrite(defs[name], _INTERNAL)
                out[key] = _COMPONENT + name
            else:
                out[key] = rewrite(value, prefix)
        return out

    bundled: dict[str, Any] = rewrite(doc, _EXTERNAL)
    components = bundled.setdefault("components", {})
    components["schemas"] = {**components.get("schemas", {}), **dict(sorted(used.items()))}
    return bundled


def bundled_json(name: str) -> bytes:
    """The spec file `name`, bundled, as the JSON the gateway serves."""
    return orjson.dumps(bundle(load(name), load(SCHEMAS_FILE)))

"""The API documents as the tests read them: the bundled AsyncAPI and OpenAPI documents (what the
gateway serves), the frame types they document, and validators of frames and HTTP answers
against them; and the official JSON Schema of AsyncAPI 3.0, from the npm package @asyncapi/specs."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import tarfile
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import jsonschema
import orjson
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.apidocs import bundled_json

ASYNCAPI_SPECS = "6.11.1"  # @asyncapi/specs on npm: the official JSON Schemas of AsyncAPI
ASYNCAPI_SPECS_SHA512 = "A3WBLqAKGoJ2+6FWFtpjBlCQ1oFCcs4GxF7zsIGvNqp/klGUHjlA3aAcZ9XMMpLGE8zPeYDz2x9FmO6DSuKraQ=="
CACHE = Path.home() / ".cache" / "roomcast"  # (third-party files live outside the repository)

Doc = dict[str, Any]
Direction = Literal["receive", "send"]  # the gateway receives client frames, sends server frames

# A client frame's integers must be JSON integers: the server refuses 5.0, which JSON Schema
# (draft 6 on) counts as an integer.
_STRICT_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
_Strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_STRICT_TYPES)


@cache
def asyncapi() -> Doc:
    doc: Doc = orjson.loads(bundled_json("asyncapi.yaml"))
    return doc


@cache
def openapi() -> Doc:
    doc: Doc = orjson.loads(bundled_json("openapi.yaml"))
    return doc


def pointer(parts: list[str]) -> str:
    """A JSON pointer to `parts`, as the fragment of a reference."""
    return "#/" + "/".join(quote(p.replace("~", "~0").replace("/", "~1"), safe="") for p in parts)


def resolve(doc: Doc, node: Any) -> Any:
    """`node`, following local references (`#/a/b`) through `doc`."""
    while isinstance(node, dict) and str(node.get("$ref", "")).startswith("#/"):
        parts = [p.replace("~1", "/").replace("~0", "~") for p in node["$ref"][2:].split("/")]
        node = doc
        for part in parts:
            node = node[part]
    return node


def frame_types(direction: Direction) -> dict[str, str]:
    """frame type -> the AsyncAPI message that documents it, for what the gateway receives or sends
    (the `type` const of each message payload of the operations with that action)."""
    doc = asyncapi()
    out: dict[str, str] = {}
    for op in doc["operations"].values():
        if op["action"] != direction:
            continue
        for ref in op["messages"]:
            message = resolve(doc, ref)
            name = message["name"]
            kind = resolve(doc, message["payload"])["properties"]["type"]["const"]
            assert out.setdefault(kind, name) == name, f"two messages document {direction} frames of type {kind}"
    return out


def _validator(doc: Doc, uri: str, parts: list[str]) -> jsonschema.Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(uri, Resource.from_contents(doc, DRAFT202012))
    return jsonschema.Draft202012Validator({"$ref": uri + pointer(parts)}, registry=registry)


def inline(doc: Doc, node: Any) -> Any:
    """`node` with every local reference replaced by what it points at (the schemas have no cycles;
    a keyword beside a `$ref` is only ever a description). Validating needs no lookups then: the
    fuzz test checks thousands of frames."""
    if isinstance(node, list):
        return [inline(doc, item) for item in node]
    if isinstance(node, dict):
        return inline(doc, resolve(doc, node)) if "$ref" in node else {k: inline(doc, v) for k, v in node.items()}
    return node


@cache
def _frame_validator(direction: Direction, kind: str) -> jsonschema.Draft202012Validator:
    payload = asyncapi()["components"]["messages"][frame_types(direction)[kind]]["payload"]
    cls = _Strict if direction == "receive" else jsonschema.Draft202012Validator
    return cls(inline(asyncapi(), payload))


def frame_errors(frame: object, direction: Direction) -> list[str]:
    """Why `frame` is not a frame the AsyncAPI document allows in that direction ([] when it is)."""
    if not isinstance(frame, dict) or frame.get("type") not in frame_types(direction):
        return [f"no {direction} frame of type {frame.get('type') if isinstance(frame, dict) else frame!r}"]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _frame_validator(direction, frame["type"]).iter_errors(frame)]


def schema_errors(doc: Doc, uri: str, parts: list[str], instance: object) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _validator(doc, uri, parts).iter_errors(instance)]


def response_errors(path: str, status: int, content_type: str, body: bytes,
                    headers: dict[str, str]) -> list[str]:
    """Why a GET answer of the gateway is not what the OpenAPI document says ([] when it is).
    `path` is the documented path (e.g. "/rooms/{room}/messages"); header names in lower case."""
    doc = openapi()
    responses = doc["paths"][path]["get"]["responses"]
    if str(status) not in responses:
        return [f"status {status} is not documented for {path}"]
    response = resolve(doc, responses[str(status)])
    media = content_type.split(";")[0].strip()
    if media not in response.get("content", {}):
        return [f"{path} {status}: content type {media} is not documented"]
    errors = []
    for name, header in response.get("headers", {}).items():
        value = headers.get(name.lower())
        if value is None:
            errors.append(f"{path} {status}: no {name} header")
        else:
            errors += [f"{path} {status} header {name}: {e}" for e in _header_errors(doc, header, value)]
    parsed: object = orjson.loads(body) if media == "application/json" else body.decode()
    location = ["paths", path, "get", "responses", str(status), "content", media, "schema"]
    if "$ref" in responses[str(status)]:
        location = [*responses[str(status)]["$ref"][2:].split("/"), "content", media, "schema"]
    return errors + [f"{path} {status}: {e}" for e in schema_errors(doc, "urn:openapi", location, parsed)]


def _header_errors(doc: Doc, header: Doc, value: str) -> list[str]:
    schema = resolve(doc, header)["schema"]
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]


def asyncapi_meta_schema() -> Doc:
    """The official JSON Schema of AsyncAPI 3.0.0 (its one-file form without `$id`s), from the npm
    package @asyncapi/specs: fetched once with `npm pack` into the cache, checked against its
    pinned integrity."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"asyncapi-specs-{ASYNCAPI_SPECS}.tgz"
    if not tarball.exists():
        subprocess.run(["npm", "pack", f"@asyncapi/specs@{ASYNCAPI_SPECS}", "--pack-destination", str(CACHE)],
                       check=True, capture_output=True, timeout=300, cwd=CACHE)
    digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    assert digest == ASYNCAPI_SPECS_SHA512, f"{tarball} is not @asyncapi/specs@{ASYNCAPI_SPECS}: delete it"
    with tarfile.open(tarball) as tar:
        member = tar.extractfile("package/schemas/3.0.0-without-$id.json")
        assert member is not None
        schema: Doc = json.load(member)
    return schema

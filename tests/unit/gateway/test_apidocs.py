"""The AsyncAPI and OpenAPI documents: valid by the official validators, and in step with the code
(every frame type the gateway handles or emits, every error code, every route). Real frames and
answers are checked against them in tests/integration/test_api_spec.py."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Mount, Route, WebSocketRoute

from gateway.apidocs import SCHEMAS_FILE, SPEC, bundle, load
from gateway.app import create_app
from gateway.protocol import KNOWN_TYPES, Auth, Close, Err, Inbound
from shared.settings import Settings
from tests.support_spec import (
    asyncapi,
    asyncapi_meta_schema,
    frame_errors,
    frame_types,
    openapi,
    resolve,
    schema_errors,
)

ROOT = Path(__file__).resolve().parents[3]
# Every frame the server builds names its type in a literal: a dict ("type": "joined") or
# pre-serialised JSON (b'{"type":"message",').
EMITTED = re.compile(r'"type"\s*:\s*"([a-z_]+)"')


def test_the_asyncapi_document_is_valid_asyncapi_3() -> None:
    validator = jsonschema.Draft7Validator(asyncapi_meta_schema())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(asyncapi())]
    assert errors == []
    assert asyncapi()["asyncapi"] == "3.0.0"


def test_the_openapi_document_is_valid_openapi_3_1() -> None:
    validate(openapi())  # what /openapi.json serves
    validate(load("openapi.yaml"), base_uri=(SPEC / "openapi.yaml").as_uri())  # the source, schemas.yaml beside it
    assert openapi()["openapi"] == "3.1.0"


def test_bundling_keeps_every_schema_once_and_no_reference_to_the_file() -> None:
    schemas = load(SCHEMAS_FILE)
    for doc in (asyncapi(), openapi()):
        assert SCHEMAS_FILE not in str(doc)
        for name, schema in doc["components"]["schemas"].items():
            assert "#/$defs/" not in str(schema), name
    assert set(asyncapi()["components"]["schemas"]) | set(openapi()["components"]["schemas"]) <= set(schemas["$defs"])
    assert bundle({"a": {"$ref": "other.yaml#/x"}}, schemas)["a"] == {"$ref": "other.yaml#/x"}  # left alone


@pytest.mark.parametrize("meta", [jsonschema.Draft7Validator, jsonschema.Draft202012Validator])
def test_every_schema_is_a_schema_in_both_dialects(meta: Any) -> None:
    for schema in load(SCHEMAS_FILE)["$defs"].values():
        meta.check_schema(schema)


def test_every_example_fits_its_schema() -> None:
    checked = 0
    for uri, doc in (("urn:asyncapi", asyncapi()), ("urn:openapi", openapi())):
        for name, schema in doc["components"]["schemas"].items():
            for example in schema.get("examples", []):
                assert schema_errors(doc, uri, ["components", "schemas", name], example) == [], (name, example)
                checked += 1
    for name, message in asyncapi()["components"]["messages"].items():
        for example in message["examples"]:
            assert schema_errors(asyncapi(), "urn:asyncapi", ["components", "messages", name, "payload"],
                                 example["payload"]) == [], (name, example)
            checked += 1
    for path, item in openapi()["paths"].items():
        for status, response in item["get"]["responses"].items():
            where = (response["$ref"][2:].split("/") if "$ref" in response
                     else ["paths", path, "get", "responses", status])
            for media, content in resolve(openapi(), response).get("content", {}).items():
                if "example" in content:
                    assert schema_errors(openapi(), "urn:openapi", [*where, "content", media, "schema"],
                                         content["example"]) == [], (path, status, media)
                    checked += 1
    assert checked > 30


def test_every_frame_type_the_gateway_handles_is_documented() -> None:
    handled = {typing.get_args(model.model_fields["type"].annotation)[0] for model in typing.get_args(Inbound)}
    assert handled == KNOWN_TYPES
    handled.add(typing.get_args(Auth.model_fields["type"].annotation)[0])  # (a connection's first frame)
    assert set(frame_types("receive")) == handled


def test_every_frame_type_the_gateway_emits_is_documented() -> None:
    sources = [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "shared").rglob("*.py")]
    emitted = {kind for path in sources for kind in EMITTED.findall(path.read_text())}
    assert emitted >= {"joined", "left", "message", "ack", "history", "error", "pong"}  # (the scan finds them)
    assert set(frame_types("send")) == emitted


def test_every_error_code_is_documented() -> None:
    codes = {v for k, v in vars(Err).items() if not k.startswith("_")}
    assert set(asyncapi()["components"]["schemas"]["ErrorCode"]["enum"]) == codes


def test_the_channel_carries_every_message_and_each_is_used() -> None:
    doc = asyncapi()
    on_channel = {resolve(doc, m)["name"] for m in doc["channels"]["connection"]["messages"].values()}
    used = {resolve(doc, m)["name"] for op in doc["operations"].values() for m in op["messages"]}
    assert on_channel == used == {m["name"] for m in doc["components"]["messages"].values()}


def _served(settings: Settings) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for route in create_app(settings).routes:  # (the lifespan does not run: nothing connects)
        if isinstance(route, Route):
            out.setdefault(route.path, set()).update(set(route.methods or ()) - {"HEAD"})
        elif isinstance(route, Mount):  # the chat page and its files
            out[route.path or "/"] = {"GET"}
        else:
            assert isinstance(route, WebSocketRoute) and route.path == "/ws", route  # (in the AsyncAPI document)
    return out


def test_the_openapi_paths_are_the_routes_the_gateway_serves() -> None:
    documented = {path: {m.upper() for m in item} for path, item in openapi()["paths"].items()}
    dev = _served(Settings(dev_mode=True))
    assert dev == documented
    assert set(documented) - set(_served(Settings(dev_mode=False))) == {"/dev/token"}  # (documented as dev only)
    assert "DEV_MODE" in openapi()["paths"]["/dev/token"]["get"]["description"]


# --- docs/protocol.md, the prose reference

PROTOCOL_MD = ROOT / "docs" / "protocol.md"
TRANSCRIPT = re.compile(r"^([A-Z]) ([<>]) (\{.*\})$", re.MULTILINE)
JSON_BLOCK = re.compile(r"^```json\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_every_frame_of_the_protocol_reference_fits_the_asyncapi_document() -> None:
    text = PROTOCOL_MD.read_text()
    transcript = [(who, arrow, json.loads(raw)) for who, arrow, raw in TRANSCRIPT.findall(text)]
    assert len(transcript) > 20
    for i, (who, arrow, frame) in enumerate(transcript):  # what a reader types (>), what the server sent (<)
        if arrow == "<" or frame_errors(frame, "receive") == []:
            assert frame_errors(frame, "send" if arrow == "<" else "receive") == [], frame
        else:  # a bad frame, shown with the error it gets
            answer = next(f for w, a, f in transcript[i + 1:] if (w, a) == (who, "<"))
            assert answer["type"] == "error" and answer["ref"] in frame.values(), (frame, answer)
    examples = [line for block in JSON_BLOCK.findall(text) for line in block.splitlines() if line.strip()]
    assert len(examples) > 15
    for raw in examples:  # (a `history` example may be either direction)
        frame = json.loads(raw)
        assert [] in (frame_errors(frame, "receive"), frame_errors(frame, "send")), raw


def test_the_protocol_reference_names_every_frame_error_and_close_code() -> None:
    text = PROTOCOL_MD.read_text()
    for kind in {*frame_types("receive"), *frame_types("send")}:
        assert re.search(rf"^#### {kind}\b", text, re.MULTILINE), kind
    for code in {v for k, v in vars(Err).items() if not k.startswith("_")}:
        assert f"\n| `{code}` |" in text, code
    for close in Close:
        if close is not Close.NORMAL:
            assert f"\n| {close.value} |" in text, close


@pytest.mark.parametrize("doc", ["docs/protocol.md", "README.md", "client/README.md"])
def test_relative_links_point_inside_the_repository(doc: str) -> None:
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" not in target:
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), (doc, target)

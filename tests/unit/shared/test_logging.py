"""Log lines are JSON objects with the service and node; client faults do not spam tracebacks."""

from __future__ import annotations

import logging

import orjson

from shared.logging import ClientFaultFilter, JsonFormatter


def test_a_log_line_is_one_json_object_with_service_node_and_extras() -> None:
    record = logging.makeLogRecord({"name": "roomcast.x", "levelname": "INFO", "levelno": 20,
                                    "msg": "hello %s", "args": ("room",), "room": "lobby"})
    line = JsonFormatter("gateway", "node-1").format(record)
    out = orjson.loads(line)
    assert out["msg"] == "hello room" and out["service"] == "gateway" and out["node"] == "node-1"
    assert out["room"] == "lobby" and out["level"] == "INFO" and "\n" not in line


def test_invalid_utf8_from_a_client_is_not_logged_as_an_error_with_a_traceback() -> None:
    try:
        b"\xff".decode()
    except UnicodeDecodeError as e:
        exc = e
    record = logging.makeLogRecord({"name": "uvicorn.error", "levelno": logging.ERROR, "levelname": "ERROR",
                                    "msg": "Invalid UTF-8", "exc_info": (type(exc), exc, None)})
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    assert ClientFaultFilter().filter(record) is False  # demoted to INFO, below the logger's level
    assert record.levelno == logging.INFO and record.exc_info is None
    other = logging.makeLogRecord({"name": "uvicorn.error", "levelno": logging.ERROR, "msg": "real"})
    assert ClientFaultFilter().filter(other) is True

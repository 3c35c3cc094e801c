"""Close codes are defined once, in gateway/protocol.py: the chat page imports them from
gateway/static/protocol.js, generated from that enum, and uses no code of its own."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.protocol import Close

STATIC = Path(__file__).resolve().parents[3] / "gateway" / "static"


def close_codes_js() -> str:
    members = "\n".join(f"  {c.name}: {c.value}," for c in Close)
    return ("// Generated from gateway/protocol.py (Close); do not edit: tests/unit/gateway/test_close_codes.py\n"
            "// holds it equal to the server's codes and prints the new text when they change.\n"
            f"export const Close = Object.freeze({{\n{members}\n}});\n")


def test_the_chat_page_module_holds_the_servers_close_codes() -> None:
    expected = close_codes_js()
    got = (STATIC / "protocol.js").read_text()
    assert got == expected, f"regenerate gateway/static/protocol.js with:\n{expected}"


def test_the_chat_page_names_every_close_code_it_handles() -> None:
    app = (STATIC / "app.js").read_text()
    assert 'import { Close } from "./protocol.js"' in app
    literal = re.findall(r"\b(?:1\d{3}|4\d{3})\b(?!\s*\))", app)
    assert not [c for c in literal if int(c) in {c.value for c in Close}], "use Close.NAME, not a number"
    used = set(re.findall(r"Close\.([A-Z_]+)", app))
    assert used and used <= {c.name for c in Close}

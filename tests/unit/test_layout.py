"""The layout holds: the runtime kernel imports no tooling, and only the store touches stored messages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ("shared", "gateway", "persister", "sweeper")  # what the service image ships
STORE = ROOT / "shared" / "store"


def kernel_files() -> list[Path]:
    return sorted(p for d in KERNEL for p in (ROOT / d).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module an import statement in the file names, at any depth (function-level ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_kernel_imports_neither_tools_nor_bench() -> None:
    assert len(kernel_files()) > 30
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in kernel_files() for m in imported(p)
           if m.split(".")[0] in ("tools", "bench", "tests")}
    assert not bad, f"the runtime kernel must not import tooling: {sorted(bad)}"


# A room's list and meta keys, and the messages table: the store's alone.
STORED = re.compile(r"\.msgs\(|\.meta\(|\b(FROM|INTO|UPDATE|JOIN)\s+messages\b|\bTRIM_IF_HEAD\b|\bLRANGE\b|\blrange\(",
                    re.IGNORECASE)


def test_only_the_store_reads_or_writes_stored_messages() -> None:
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
           for p in kernel_files() if STORE not in p.parents and p.name != "keys.py"
           for n, line in enumerate(p.read_text().splitlines(), 1) if STORED.search(line)]
    assert not bad, "outside shared/store:\n" + "\n".join(bad)


def test_the_check_sees_what_it_forbids() -> None:
    for line in ('await redis.lrange(keys.msgs(room), 0, -1)', 'cur.execute("SELECT id FROM messages")',
                 '"INSERT INTO messages (id) VALUES (%s)"', "pipe.hmget(self.keys.meta(name))"):
        assert STORED.search(line), line
    assert not STORED.search("from shared.message import Message")

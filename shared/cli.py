"""`roomcast`: the operator's command.

`token` and `migrate` are the kernel's: the service image has them (the Kubernetes migrate Job
runs `roomcast migrate`). The developer's commands (up, down, check, stats, bench) come from
tools/ through the `roomcast.commands` entry point group, where tools/ is installed: the kernel
never imports tooling, and the image, which ships no tools/, simply has no such commands.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from importlib.metadata import entry_points

from shared.settings import Settings


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from shared.auth import mint_token

    rooms = [r.strip() for r in args.rooms.split(",") if r.strip()] if args.rooms else None
    print(mint_token(settings, args.user, rooms=rooms, ttl_s=args.ttl))
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from shared.migrate import migrate

    applied = asyncio.run(migrate(settings.mysql_dsn))
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else " (up to date)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roomcast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Settings come from the environment (KAFKA_BOOTSTRAP, REDIS_URL, "
                                            "MYSQL_DSN, ...; see shared/settings.py).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("token", help="print a signed token for USER (local secret) on stdout")
    p.add_argument("user")
    p.add_argument("--rooms", help="comma-separated rooms or prefixes ending in * (default: all)")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: TOKEN_TTL_S)")
    p.set_defaults(func=cmd_token)
    p = sub.add_parser("migrate", help="create the database if missing and apply schema migrations")
    p.set_defaults(func=cmd_migrate)
    for ep in entry_points(group="roomcast.commands"):
        try:
            add_commands = ep.load()
        except ModuleNotFoundError as e:  # the package that provides them is not installed (the image)
            if e.name is None or not ep.module.startswith(e.name):
                raise
            continue
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args, Settings())
    return code


if __name__ == "__main__":
    sys.exit(main())

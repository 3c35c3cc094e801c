"""`roomcast-sweeper` / `python -m sweeper`: sweep continuously until SIGTERM, or once (`--once`)."""

from __future__ import annotations

import argparse
import asyncio

from prometheus_client import start_http_server

from shared.logging import setup_logging
from shared.runner import run_service
from shared.settings import Settings
from sweeper.service import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="roomcast-sweeper", description=__doc__)
    parser.add_argument("--once", action="store_true", help="one sweep, then exit (for a CronJob)")
    args = parser.parse_args(argv)
    settings = Settings()
    setup_logging("sweeper", settings.node_id or "sweeper", settings.log_level, settings.log_json)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)

    async def _main(stop: asyncio.Event) -> None:
        await run(settings, stop, once=args.once)

    run_service(_main)


if __name__ == "__main__":
    main()

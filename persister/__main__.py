"""`roomcast-persister`: run the persister until SIGTERM."""

from __future__ import annotations

import asyncio

from prometheus_client import start_http_server

from persister.service import run
from shared.logging import setup_logging
from shared.runner import run_service
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging("persister", settings.node_id or "persister", settings.log_level, settings.log_json)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)

    async def _main(stop: asyncio.Event) -> None:
        await run(settings, stop)

    run_service(_main)


if __name__ == "__main__":
    main()

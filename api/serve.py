"""Entry point of the api role (`appliance api`): uvicorn with uvloop and httptools."""

from __future__ import annotations

import uvicorn

from api.main import create_app
from appliance.settings import Settings


def main(settings: Settings) -> None:
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )

"""Entry point of the api role (`appliance api`): uvicorn with uvloop and httptools, its
connections opened by the fast lane's front protocol (`api/front.py`)."""

from __future__ import annotations

import uvicorn

from api.front import front_protocol
from api.main import create_app
from appliance.settings import Settings


def main(settings: Settings) -> None:
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=front_protocol(app) if settings.fast_lane else "httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )

"""Logging set-up for the entry points; modules only call logging.getLogger(__name__)."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


def configure(level: str, role: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        force=True,
    )


class EndpointLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the endpoint they concern."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"[{self.extra['endpoint'] if self.extra else '-'}] {msg}", kwargs

"""Logging set-up for the entry points; modules only call logging.getLogger(__name__)."""

from __future__ import annotations

import logging


def configure(level: str, role: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        force=True,
    )

"""Per-install identity and secrets kept in the data dir: install id, key-signing secret."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def _read_or_create(path: Path, make: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(make + "\n")
    return make


def install_id(data_dir: Path) -> str:
    """The id that labels every container this install manages; made on first start."""
    return _read_or_create(data_dir / "install-id", secrets.token_hex(6))


def key_secret(data_dir: Path) -> bytes:
    """The HMAC secret API keys are digested with; never leaves the data dir."""
    return bytes.fromhex(_read_or_create(data_dir / "key-secret", secrets.token_hex(32)))

"""Per-install identity and secrets kept in the data dir: install id, key-signing secret."""

from __future__ import annotations

import hashlib
import hmac
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


def replica_key(secret: bytes, replica_id: str) -> str:
    """The API key one vLLM or llama.cpp replica demands (its `--api-key`), so a request sent
    straight to its port, around the appliance, is refused. Each replica has its own, derived
    from the key secret and the replica's id: the api, worker and builder of one install agree
    on it without storing it, and the key a replica's own code can read from its environment
    opens no other replica. Bound to the id (fixed before the container exists), not to the
    address (a published port is Docker's choice at create). No secret, no key ("")."""
    if not secret:
        return ""
    return hmac.new(secret, b"replica-api-key:" + replica_id.encode(), hashlib.sha256).hexdigest()


def key_secret(data_dir: Path) -> bytes:
    """The HMAC secret API keys are digested with; never leaves the data dir."""
    return bytes.fromhex(_read_or_create(data_dir / "key-secret", secrets.token_hex(32)))


def callback_secret(data_dir: Path) -> bytes:
    """The secret the worker signs task callbacks with (forwarder/worker/callbacks.sign),
    derived from the key secret, which it does not reveal: `appliance callback-secret` prints it
    for callback receivers, which check `X-Appliance-Signature` with it."""
    label = b"appliance callback signature v1"
    return hmac.new(key_secret(data_dir), label, hashlib.sha256).digest()

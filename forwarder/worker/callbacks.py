"""Task callbacks: SSRF checks, HMAC signatures and delivery with retries.

The api calls `check_url` when a task is submitted; the worker's `CallbackSender` checks the
URL again at delivery, resolves the name once, refuses if any address is loopback, private,
link-local, reserved or a cloud metadata address, and then connects to the address it checked
(a pinned resolver), so a DNS answer that changes between check and connect cannot redirect
it. Redirects are never followed. Hosts an admin lists in `callback_allowed_hosts` skip the
address check (a receiver on the local network, or the tests' local receiver).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from appliance.errors import InvalidSpecError

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Appliance-Signature"
TIMESTAMP_HEADER = "X-Appliance-Timestamp"
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


class CallbackRefusedError(InvalidSpecError):
    """A callback URL that points somewhere the appliance will not send results."""


@dataclass(frozen=True)
class Target:
    """A checked callback: the URL and the addresses the connection may use."""

    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _refused_address(address: str) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # judged by the IPv4 address it carries: mapped, 6to4 (2002::/16, which a host with a
        # 6to4 tunnel sends to that address) or a Teredo client's
        carried = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if carried is not None:
            ip = carried
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata)"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
        return "private"
    if not ip.is_global:
        return "not public"
    return None


def _allowed(host: str, port: int, allowed_hosts: Sequence[str]) -> bool:
    return host in allowed_hosts or f"{host}:{port}" in allowed_hosts


def check_url(url: str, allowed_hosts: Sequence[str]) -> Target:
    """Resolve and check a callback URL; CallbackRefusedError says why it is refused."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise CallbackRefusedError("callback_url is not a URL", field="callback_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefusedError("callback_url must be an http(s) URL", field="callback_url")
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CallbackRefusedError("callback_url has a bad port", field="callback_url") from None
    allowed = _allowed(host, port, allowed_hosts)
    if host in METADATA_HOSTS and not allowed:
        raise CallbackRefusedError("callback_url names a metadata service", field="callback_url")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise CallbackRefusedError(
            f"callback_url's host {host!r} does not resolve", field="callback_url"
        ) from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allowed:
        for address in addresses:
            why = _refused_address(address)
            if why is not None:
                shown = "" if address == host.strip("[]") else f" ({address})"
                raise CallbackRefusedError(
                    f"callback_url's host {host!r} resolves to a {why} address{shown}; "
                    "such a host is taken only where the operator lists it in "
                    "APPLIANCE_CALLBACK_ALLOWED_HOSTS",
                    field="callback_url",
                )
    return Target(url, host, port, addresses)


AUTH_FIELDS = frozenset({"kind", "username", "password"})


def check_auth(auth: Mapping[str, Any] | None, field: str = "callback_auth") -> None:
    """LLM Engine's `CallbackAuth` as the worker sends it: HTTP Basic (`kind` "basic", a
    `username` and a `password`). mTLS, and credentials Basic cannot carry (a colon in the
    user name, characters outside Latin-1), are refused naming `field`: taken, they were
    dropped at delivery, and the callback went out without them or not at all."""
    if auth is None:
        return
    kind = auth.get("kind", "basic")
    if kind != "basic":
        raise CallbackRefusedError(
            f"{field}: kind {kind!r} is refused; callbacks carry HTTP Basic credentials "
            '(kind "basic", username, password) only',
            field=field,
        )
    unknown = sorted(set(auth) - AUTH_FIELDS)
    if unknown:
        raise CallbackRefusedError(f"{field}: unknown fields {unknown}", field=field)
    for part in ("username", "password"):
        value = auth.get(part)
        if not isinstance(value, str):
            raise CallbackRefusedError(f"{field}.{part} must be a string", field=field)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise CallbackRefusedError(
                f"{field}.{part} has characters HTTP Basic cannot carry (Latin-1 only)",
                field=field,
            ) from None
    if ":" in auth["username"]:
        raise CallbackRefusedError(f"{field}.username may not hold ':'", field=field)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>." + body), like Stripe and Slack;
    `secret` is the install's `appliance.install.callback_secret`."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class _PinnedResolver(AbstractResolver):
    """Answers only with the addresses `check_url` approved, so the connection goes there."""

    def __init__(self, target: Target) -> None:
        self._target = target

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower().strip("[]") != self._target.host.strip("[]"):
            raise OSError(f"refusing to resolve {host!r}: not the checked callback host")
        results: list[ResolveResult] = []
        for address in self._target.addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            results.append(
                {
                    "hostname": host,
                    "host": str(ip),
                    "port": port,
                    "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return results

    async def close(self) -> None:
        return None


def _basic_auth(auth: dict[str, Any] | None) -> aiohttp.BasicAuth | None:
    if not auth or auth.get("kind", "basic") != "basic":
        return None
    return aiohttp.BasicAuth(str(auth.get("username", "")), str(auth.get("password", "")))


async def post_once(
    target: Target, body: bytes, headers: dict[str, str], auth: Any, timeout_s: float
) -> int:
    """One delivery to the checked address; the status (a redirect is an answer, not followed)."""
    connector = aiohttp.TCPConnector(resolver=_PinnedResolver(target), use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.post(
            target.url, data=body, headers=headers, auth=auth, allow_redirects=False
        ) as response,
    ):
        await response.read()
        return response.status


@dataclass
class CallbackSender:
    """Delivers callbacks in the background of the worker's event loop."""

    secret: bytes
    allowed_hosts: tuple[str, ...] = ()
    max_attempts: int = 6
    timeout_s: float = 10.0
    first_backoff_s: float = FIRST_BACKOFF_S

    def __post_init__(self) -> None:
        self._pending: set[asyncio.Task[bool]] = set()

    def send(self, url: str, payload: dict[str, Any], auth: dict[str, Any] | None) -> None:
        task = asyncio.get_running_loop().create_task(self.deliver(url, payload, auth))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self, timeout_s: float) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout_s)

    async def deliver(self, url: str, payload: dict[str, Any], auth: dict[str, Any] | None) -> bool:
        """Check, sign, POST; retry failures with exponential backoff. True once delivered."""
        body = json.dumps(payload).encode()
        task_id = payload.get("task_id")
        for attempt in range(1, self.max_attempts + 1):
            try:
                target = await asyncio.to_thread(check_url, url, self.allowed_hosts)
            except CallbackRefusedError as exc:
                logger.warning("callback of task %s refused: %s", task_id, exc.message)
                return False
            stamp = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                TIMESTAMP_HEADER: stamp,
                SIGNATURE_HEADER: sign(self.secret, stamp, body),
            }
            try:
                status = await post_once(target, body, headers, _basic_auth(auth), self.timeout_s)
                if 200 <= status < 300:
                    return True
                why = f"answered {status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                why = f"failed: {exc}"
            logger.info("callback of task %s %s (attempt %d)", task_id, why, attempt)
            if attempt < self.max_attempts:
                await asyncio.sleep(min(self.first_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        logger.warning("callback of task %s not delivered after %d tries", task_id, attempt)
        return False

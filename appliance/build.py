"""Which build of the hot modules a process runs (`setup.py` compiles them into wheels), and the
check every role makes at start (`appliance/cli.py`): a compiled module whose `.py` beside it
differs from the source it was compiled from is a stale build, and the role refuses to start
rather than run code older than what it reads as its source."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

RECORD = "compiled.json"  # written beside this module by setup.py's build


def compiled_sources() -> dict[str, str]:
    """Module name -> source digest for each module compiled into this install; {} when the
    install is plain Python (an editable install, a source tree)."""
    record = Path(__file__).with_name(RECORD)
    if not record.exists():
        return {}
    found: dict[str, str] = json.loads(record.read_text())
    return found


def stale_modules() -> list[str]:
    """The compiled modules whose `.py` beside them is not the source they were made from."""
    stale = []
    for name, digest in compiled_sources().items():
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is None or origin.suffix == ".py":
            continue  # not compiled here (no C compiler at build time): nothing can be stale
        source = origin.with_name(name.rsplit(".", 1)[-1] + ".py")
        if not source.exists() or hashlib.sha256(source.read_bytes()).hexdigest() != digest:
            stale.append(name)
    return stale


def describe() -> str:
    """`compiled` or `plain`, for logs and the benchmark."""
    spec = importlib.util.find_spec("forwarder.relay")
    origin = spec.origin if spec is not None and spec.origin else ""
    return "plain" if origin.endswith(".py") else "compiled"

"""Builds the package; the data plane's hot modules are compiled to C with mypyc on the way.

The fast lane's per-request Python (`api/lane/`, `forwarder/upstream.py`, and what it shares
with the general path: the head and usage readers, request counting, replica choice, key
cache lookup and the types every request reads) sets the api's peak requests/s. mypyc
compiles those typed modules to a C extension (more than twice the requests/s of the same
code as plain Python on the benchmark, `bench/RESULTS.md`), from the same source: nothing
else changes.
Where mypyc or a C compiler is missing, the build leaves them as plain Python, which behaves
the same, only slower. `APPLIANCE_COMPILE=0` skips it; `scripts/compile` builds in place.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

HOT_MODULES = [
    "api/lane/front.py",
    "api/lane/admit.py",
    "api/lane/exchange.py",
    "forwarder/upstream.py",
    "forwarder/metrics.py",
    "forwarder/usage.py",
    "forwarder/scan.py",
    "forwarder/balance.py",
    "api/callers.py",
    "forwarder/table.py",
    "appliance/caller.py",
]


def compiled() -> list[object]:
    if os.environ.get("APPLIANCE_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify

        # Without the dependencies installed (an isolated build) their types are unknown,
        # which mypyc accepts as Any; `mypy --strict` checks them in the test command.
        extensions = mypycify(
            ["--ignore-missing-imports", *HOT_MODULES], opt_level="3", group_name="appliance_hot"
        )
    except (Exception, SystemExit) as exc:  # mypyc missing, or it refused them
        print(f"setup.py: hot modules stay plain Python: {exc!r}", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: the plain modules serve
    return list(extensions)


setup(ext_modules=compiled())

"""Builds the package; in a wheel, the data plane's hot modules are compiled to C with mypyc.

The inference core's per-request Python (`api/lane/front.py`, `api/inference/`,
`forwarder/relay.py`, `forwarder/upstream.py`, and the readers, counters, replica choice, key
lookup and types every request goes through) sets the api's peak requests/s. mypyc compiles
those typed modules to a C extension (several times the requests/s of the same code as plain
Python on the benchmark, `bench/RESULTS.md`), from the same source: nothing else changes.

Only a wheel is compiled (`pip wheel .`, `pip install .`, the image; `scripts/compile` builds
one for the tests into build/compiled). An editable install and an in-place build stay plain
Python, so a compiled module never sits in the source tree shadowing the `.py` it came from.
A wheel records the digest of each compiled module's source (`appliance/compiled.json`); the
roles refuse to start when the `.py` beside a compiled module differs (`appliance/build.py`).
Where mypyc or a C compiler is missing, the build leaves the modules plain Python, which
behaves the same, only slower. `APPLIANCE_COMPILE=0` skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HOT_MODULES = [
    "api/lane/front.py",
    "api/inference/call.py",
    "api/inference/admission.py",
    "api/inference/llm_engine.py",
    "api/callers.py",
    "forwarder/relay.py",
    "forwarder/upstream.py",
    "forwarder/metrics.py",
    "forwarder/usage.py",
    "forwarder/media.py",
    "forwarder/scan.py",
    "forwarder/balance.py",
    "forwarder/table.py",
    "forwarder/paths.py",
    "forwarder/chat.py",
    "forwarder/llama_cpp.py",
    "appliance/caller.py",
]
RECORD = "appliance/compiled.json"


def digests() -> dict[str, str]:
    """Module name -> sha256 of its source, for each hot module."""
    return {
        path[:-3].replace("/", "."): hashlib.sha256(Path(path).read_bytes()).hexdigest()
        for path in HOT_MODULES
    }


class BuildExt(build_ext):
    """Compiles only out of the source tree: an editable install or an in-place build skips
    the extensions (each is optional), leaving the plain modules."""

    def run(self) -> None:
        if self.inplace or getattr(self, "editable_mode", False):
            return
        super().run()


class BuildPy(build_py):
    """Records the compiled modules' source digests in the build."""

    def run(self) -> None:
        super().run()
        if self.distribution.ext_modules and not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / RECORD
            target.write_text(json.dumps(digests(), indent=1, sort_keys=True) + "\n")


def compiled() -> list[object]:
    if os.environ.get("APPLIANCE_COMPILE", "1") == "0":
        return []
    if {"editable_wheel", "develop"} & set(sys.argv):  # stays plain: see BuildExt
        return []
    try:
        from mypyc.build import mypycify

        # Without the dependencies installed (an isolated build) their types are unknown,
        # which mypyc accepts as Any; `mypy --strict` checks them in the test command.
        # its own mypy cache: `mypy` (scripts/test) may be checking the tree at the same time
        options = ["--ignore-missing-imports", "--cache-dir", "build/mypyc-cache"]
        extensions = mypycify([*options, *HOT_MODULES], opt_level="3", group_name="appliance_hot")
    except (Exception, SystemExit) as exc:  # mypyc missing, or it refused them
        print(f"setup.py: hot modules stay plain Python: {exc!r}", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: the plain modules serve
    return list(extensions)


setup(ext_modules=compiled(), cmdclass={"build_ext": BuildExt, "build_py": BuildPy})

"""The harness's ports: an appliance's api never starts on a port another test was handed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import harness

HAND_OUT = """
import sys
from pathlib import Path
from tests import harness
harness.PORTS_HANDED = Path(sys.argv[1])
harness.kernel_port = lambda: 40001
print(harness.free_port())
"""


def test_a_port_another_process_was_handed_is_not_handed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when the kernel offers two xdist workers the same port before either binds it: the
    second is handed another, so its api cannot lose the port to the first's and its test
    talk to the first's install."""
    registry = tmp_path / "ports.json"
    other = subprocess.run(
        [sys.executable, "-c", HAND_OUT, str(registry)],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert other.stdout.split() == ["40001"]
    offered = iter([40001, 40001, 40003])
    monkeypatch.setattr(harness, "PORTS_HANDED", registry)
    monkeypatch.setattr(harness, "kernel_port", lambda: next(offered))
    assert harness.free_port() == 40003


def test_a_port_is_handed_again_once_its_hold_has_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "ports.json"
    registry.write_text('{"40001": 0}')  # handed out long ago
    monkeypatch.setattr(harness, "PORTS_HANDED", registry)
    monkeypatch.setattr(harness, "kernel_port", lambda: 40001)
    assert harness.free_port() == 40001

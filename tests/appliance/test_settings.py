"""A bad setting stops every command at once with a line that names the variable, never a
traceback from deep inside a role after the others have started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance.settings import Settings
from tests.harness import ADMIN_KEY


def test_an_admin_key_not_shaped_like_a_key_is_refused_with_its_shape() -> None:
    with pytest.raises(ValidationError, match=r"mea_<12 hex digits>_<secret>"):
        Settings(admin_key="sk-my-own-admin-key")
    assert Settings(admin_key=ADMIN_KEY).admin_key == ADMIN_KEY
    for weak in ("mea_0123456789ab_", "mea_0123456789ab_short"):  # the id is shown: no secret
        with pytest.raises(ValidationError, match="needs at least 16 characters"):
            Settings(admin_key=weak)
    assert Settings(admin_key="").admin_key is None  # compose passes it through empty: unset


def test_up_with_a_bad_admin_key_says_so_and_starts_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        {
            "APPLIANCE_DATA_DIR": str(tmp_path / "data"),
            "APPLIANCE_ADMIN_KEY": "sk-my-own-admin-key",
            "APPLIANCE_REDIS_URL": "redis://127.0.0.1:1/0",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "APPLIANCE_ADMIN_KEY" in done.stderr
    assert "mea_<12 hex digits>_<secret>" in done.stderr and "Value error" not in done.stderr
    assert not (tmp_path / "data").exists()  # no role started, nothing was made


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("APPLIANCE_APPROVED_IMAGES", "registry.local/app:1", "not JSON"),
        ("APPLIANCE_CORS_ORIGINS", "[https://a.example", "not JSON"),
        ("APPLIANCE_PORT", "70000", "less than or equal to 65535"),
        ("APPLIANCE_RECONCILE_INTERVAL_S", "-1", "greater than 0"),
        ("APPLIANCE_ROUTING_REFRESH_S", "0", "greater than 0"),
        ("APPLIANCE_ACTIVATION_TIMEOUT_S", "-5", "greater than or equal to 0"),
        ("APPLIANCE_MAX_BODY_BYTES", "-1", "greater than or equal to 1"),
        (
            "APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT",
            "9000000",
            "at least 4 times APPLIANCE_MAX_BODY_BYTES",
        ),
        ("APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT", "1000", "greater than or equal to 8388608"),
        ("APPLIANCE_CALLBACK_TIMEOUT_S", "0", "greater than 0"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(variable: str, value: str, said: str) -> None:
    """A list that is not JSON stopped every role with pydantic-settings' traceback, and a
    negative interval, timeout or body size started an appliance that spun or refused every
    request: each is a line naming the variable, before anything starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env[variable] = value
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "export"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"appliance export: {variable}: ")
    assert said in done.stderr and "Value error" not in done.stderr  # pydantic's own prefix


def test_a_health_check_that_cannot_reach_redis_says_so_in_a_line() -> None:
    """`appliance health worker` (compose's health check) printed a redis-py traceback when
    Redis was away, which `docker inspect` then showed as the check's output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_REDIS_URL"] = "redis://127.0.0.1:1/0"
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "health", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("appliance health: cannot reach Redis: ")


@pytest.mark.parametrize("role", ["api", "builder", "worker"])
def test_a_data_directory_a_role_cannot_make_is_one_line_naming_it(
    tmp_path: Path, role: str
) -> None:
    """APPLIANCE_DATA_DIR under a file (a typo, a volume mounted as a file) stopped every role
    with a FileNotFoundError or NotADirectoryError traceback."""
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        {
            "APPLIANCE_DATA_DIR": str(tmp_path / "a-file" / "data"),
            "APPLIANCE_REDIS_URL": "redis://127.0.0.1:1/0",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "appliance", role],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"appliance {role}: cannot use the data directory" in done.stderr, done.stderr
    assert "APPLIANCE_DATA_DIR" in done.stderr

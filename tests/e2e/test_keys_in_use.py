"""Keys in use with real containers: per-key limits give 429 with Retry-After to one key while
another's requests all succeed, and no key or token used here reaches a log, the database file
or a model container's configuration."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable

import httpx

from builder.specs import HF_CACHE_MOUNT, HF_TOKEN_FILE
from tests.e2e.lifecycle import ON_FAKE_GPUS, create, standin_body, wait_status
from tests.harness import ADMIN_KEY, Appliance

HF_TOKEN = "hf_appliancetesttokenNOTREAL0123456789"
CHAT = {"model": "limited", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def key(admin: httpx.Client, team: str, **limits: int) -> str:
    made = admin.post("/v1/api-keys", json={"name": team, "team": team, "user": team, **limits})
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def test_limits_and_secrets(make_appliance: Callable[..., Appliance]) -> None:
    appliance = make_appliance(**ON_FAKE_GPUS, APPLIANCE_HF_TOKEN=HF_TOKEN)
    admin = appliance.client()
    eid = create(
        admin,
        standin_body("limited", public_inference=True, env={"VLLM_STANDIN_TOKEN_DELAY_S": "0.05"}),
    )
    wait_status(admin, eid, "READY")
    slow_key, calm_key = key(admin, "slow", requests_per_minute=3), key(admin, "calm")
    narrow_key = key(admin, "narrow", max_concurrent_requests=1, max_tokens_per_request=64)
    slow, calm, narrow = (appliance.client(k) for k in (slow_key, calm_key, narrow_key))

    codes = [slow.post("/v1/chat/completions", json=CHAT).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    over = slow.post("/v1/chat/completions", json=CHAT)
    assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert [calm.post("/v1/chat/completions", json=CHAT).status_code for _ in range(6)] == [200] * 6

    holding = threading.Thread(
        target=lambda: narrow.post("/v1/chat/completions", json={**CHAT, "max_tokens": 60})
    )
    holding.start()
    try:
        time.sleep(1.0)  # the first request streams its 60 tokens for 3 s
        second = narrow.post("/v1/chat/completions", json=CHAT)
        assert second.status_code == 429 and "in flight" in second.text
    finally:
        holding.join(30)
    assert narrow.post("/v1/chat/completions", json=CHAT).status_code == 200
    too_many = narrow.post("/v1/chat/completions", json={**CHAT, "max_tokens": 65})
    assert too_many.status_code == 400 and "max_tokens=65" in too_many.text

    [container] = appliance.containers()

    def read(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "exec", container, "cat", path], capture_output=True, text=True
        )

    # the server (which fetches its own weights here) can read it, in its own container...
    assert read(HF_TOKEN_FILE).stdout == HF_TOKEN
    assert read(f"{HF_CACHE_MOUNT}/token").returncode != 0  # ...not in the shared cache,
    inspect = subprocess.run(
        ["docker", "inspect", container], capture_output=True, text=True, check=True
    ).stdout
    logs = appliance.logs()
    database = b"".join(p.read_bytes() for p in appliance.data_dir.glob("appliance.db*"))
    for secret in (ADMIN_KEY, slow_key, calm_key, narrow_key, HF_TOKEN):
        assert secret not in inspect  # in no container's configuration,
        assert secret not in logs  # no log line,
        assert secret.encode() not in database  # and not in the database

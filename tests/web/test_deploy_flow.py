"""The whole path in a browser, on a real Gemma 3 270M llama.cpp endpoint (one start): sign
in, create it with the form, watch it reach READY step by step, chat in the playground with
tokens appearing before the answer ends, see its charts, edit its replicas, look at tasks,
make and revoke a key, delete it, sign out. Every page is screenshot and checked at 1280 px
and 390 px."""

from __future__ import annotations

import time
from typing import Any

import httpx

from appliance.db import open_engine, session_scope
from appliance.models import Batch, Task
from tests.harness import ADMIN_KEY, GEMMA_FILE, Appliance, wait_until
from tests.web.browser import check_page, field_error, sign_in

READY_WITHIN_MS = 120_000

# Records the answer's text at every DOM change, to prove it grew while still streaming.
WATCH_ANSWER_JS = """
() => {
  window.__seen = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('.msg-assistant');
    const a = answers[answers.length - 1];
    if (a) window.__seen.push({state: a.dataset.state, length: a.textContent.length});
  }).observe(document.querySelector('[data-messages]'),
             {childList: true, subtree: true, characterData: true, attributes: true});
}
"""


def add_task_rows(appliance: Appliance, endpoint_id: str) -> str:
    """A finished async task and a batch, written as the async workers would."""
    engine = open_engine(appliance.data_dir / "appliance.db")
    now = time.time()
    with session_scope(engine) as session:
        session.add(
            Task(
                id="task_ui_example",
                endpoint_id=endpoint_id,
                owner="admin",
                created_by="admin",
                status="SUCCESS",
                payload={"prompt": "Name three colours.", "max_new_tokens": 16},
                result={"text": "Red, green and blue.", "num_completion_tokens": 6},
                attempts=1,
                created_at=now - 5,
                started_at=now - 4,
                finished_at=now - 3,
            )
        )
        session.add(
            Batch(
                id="batch_ui_example",
                owner="admin",
                created_by="admin",
                endpoint="/v1/chat/completions",
                input_file_id="file_example",
                status="completed",
                request_counts={"total": 3, "completed": 3, "failed": 0},
            )
        )
    engine.dispose()
    return "task_ui_example"


def chat(page: Any) -> tuple[str, list[dict[str, Any]]]:
    page.fill("#p-max-tokens", "48")
    page.fill("#p-temperature", "0")
    page.evaluate(WATCH_ANSWER_JS)
    page.fill("[data-composer] textarea", "Write two sentences about the sea.")
    page.click("[data-send]")
    answer = page.locator(".msg-assistant").last
    page.wait_for_function(
        "() => document.querySelector('.msg-assistant')?.dataset.state === 'done'",
        timeout=120_000,
    )
    return answer.inner_text(), page.evaluate("window.__seen")


def test_deploy_chat_edit_delete_and_keys(appliance: Appliance, page: Any) -> None:
    base, api = appliance.url, appliance.client()
    sign_in(page, base, ADMIN_KEY)
    cookie = next(c for c in page.context.cookies() if c["name"] == "mea_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # Create the endpoint with the form and watch it deploy.
    page.click("text=New endpoint")
    page.fill("#f-name", "gemma")
    page.select_option("#f-framework", "llamacpp")
    page.fill("#f-model", GEMMA_FILE)
    page.fill("#f-min_replicas", "1")
    page.fill("#f-max_replicas", "1")
    assert not page.is_checked("#f-public")  # private unless asked, as the tenancy rule says
    page.click("button.primary[type=submit]")
    page.wait_for_selector("ol.steps")
    endpoint_id = page.url.rsplit("/", 1)[1]
    assert endpoint_id.startswith("end_")
    assert api.get(f"/v1/model-endpoints/{endpoint_id}").json()["public_inference"] is False
    check_page(page, "endpoint-deploying")
    page.wait_for_selector('[data-status="READY"]', timeout=READY_WITHIN_MS)
    states = page.eval_on_selector_all("li.step", "els => els.map(e => e.className)")
    assert states == ["step done"] * 5, states
    assert page.locator("#replicas").inner_text().count("ready") == 1
    page.wait_for_function("() => document.querySelector('[data-logs]').textContent.length > 20")
    assert page.inner_text("[data-logs-state]") in {"following", "waiting for replicas…"}

    # The endpoints table shows it with its replicas.
    page.click("nav >> text=Endpoints")
    row = page.locator('tr[data-endpoint="gemma"]')
    assert "READY" in row.inner_text() and "llamacpp" in row.inner_text()
    assert row.locator('[data-col="replicas"]').inner_text() == "1 / 1"

    # Chat: the answer grows while it streams.
    page.click("nav >> text=Playground")
    assert page.input_value("#p-endpoint") == "gemma"
    text, seen = chat(page)
    assert text.strip(), "the model answered nothing"
    streaming = [s["length"] for s in seen if s["state"] == "streaming" and s["length"] > 0]
    assert streaming and min(streaming) < len(text), f"no partial answer was shown: {seen[-5:]}"
    assert len(set(streaming)) >= 2, "tokens did not arrive in several updates"
    assert page.inner_text('[data-stat="speed"]').endswith("tok/s")
    check_page(page, "playground")

    # The request shows up in the endpoint's charts and the table's requests per minute.
    page.goto(f"{base}/ui/endpoints/{endpoint_id}")

    def charts_drawn() -> bool:
        page.reload()
        return bool(page.locator(".chart svg").count() == 3)

    wait_until(charts_drawn, 40, "the request charts", every_s=2)
    check_page(page, "endpoint")
    page.click("nav >> text=Endpoints")
    assert row.locator("td").nth(6).inner_text() != "0"
    check_page(page, "endpoints")

    # Edit: a bad value is refused next to its field, then the replicas change.
    page.goto(f"{base}/ui/endpoints/{endpoint_id}/edit")
    page.fill("#f-min_replicas", "2")
    page.click("button.primary[type=submit]")
    assert "must not exceed" in field_error(page, "min_replicas")
    assert (
        api.get(f"/v1/model-endpoints/{endpoint_id}").json()["deployment_state"]["min_workers"] == 1
    )
    check_page(page, "endpoint-edit-errors")
    page.fill("#f-min_replicas", "1")
    page.fill("#f-max_replicas", "2")
    page.click("button.primary[type=submit]")
    page.wait_for_url(f"{base}/ui/endpoints/{endpoint_id}")
    state = api.get(f"/v1/model-endpoints/{endpoint_id}").json()["deployment_state"]
    assert (state["min_workers"], state["max_workers"]) == (1, 2)
    assert "1 \u2013 2" in page.inner_text("dl.spec")  # en dash
    states = page.eval_on_selector_all("li.step", "els => els.map(e => e.className)")
    assert states == ["step done"] * 5, states  # a replica-count edit rolls nothing
    page.goto(f"{base}/ui/endpoints/{endpoint_id}/edit")  # saved again unchanged: no event
    page.click("button.primary[type=submit]")
    page.wait_for_url(f"{base}/ui/endpoints/{endpoint_id}")
    updates = page.locator(".timeline li", has=page.locator(".kind-updated")).all_inner_texts()
    assert len(updates) == 1 and "max replicas 1 → 2" in updates[0], updates

    # GPUs (none on this machine), tasks and a task's result.
    page.click("nav >> text=GPUs")
    check_page(page, "gpus")
    add_task_rows(appliance, endpoint_id)
    page.click("nav >> text=Tasks")
    assert "task_ui_example" in page.inner_text("#tasks")
    assert "3 / 3" in page.inner_text("#batches")
    # a batch's `endpoint` is OpenAI's route (/v1/chat/completions), not one of the endpoints
    assert page.locator("#batches th").all_inner_texts()[:2] == ["Batch", "Route"]
    check_page(page, "tasks")
    page.click("text=task_ui_example")
    assert "Red, green and blue." in page.inner_text("#task-result")
    check_page(page, "task")

    # Keys: made (shown once, works), listed, revoked (refused within a second).
    page.click("nav >> text=API keys")
    page.fill("#f-name", "notebook")
    page.click("#key-form button[type=submit]")
    key_text = page.input_value("#new-key-text")
    check_page(page, "keys-created")
    headers = {"Authorization": f"Bearer {key_text}"}
    assert httpx.get(base + "/v1/models", headers=headers).status_code == 200
    page.goto(base + "/ui/keys")
    assert key_text not in page.content()  # shown once
    page.locator('tr[data-key="notebook"] button').click()
    page.wait_for_selector('tr[data-key="notebook"] [data-state="revoked"]')
    wait_until(
        lambda: httpx.get(base + "/v1/models", headers=headers).status_code == 401,
        2,
        "the revoked key to be refused",
    )
    check_page(page, "keys")
    page.locator('tr[data-key="admin"] button').click()  # the only administrator key: kept
    assert "last active administrator key" in page.locator('[data-error-for=""]').inner_text()

    # Delete, then sign out.
    page.goto(f"{base}/ui/endpoints/{endpoint_id}")
    page.click("button.danger")
    page.wait_for_url(base + "/ui/endpoints")
    wait_until(
        lambda: api.get(f"/v1/model-endpoints/{endpoint_id}").status_code == 404,
        60,
        "the endpoint to be deleted",
    )
    page.wait_for_selector("text=No endpoints yet", timeout=15_000)
    assert appliance.containers() == []
    page.click("text=Sign out")
    page.wait_for_url(base + "/ui/sign-in")
    page.goto(base + "/ui/endpoints")
    assert "/ui/sign-in" in page.url

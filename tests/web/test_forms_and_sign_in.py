"""The UI without a model: sign-in and its cookie, CSRF on every change, bad form input shown
next to its field with nothing created, keys made and revoked, and the GPU page with an
injected inventory. Every page is screenshot and checked at 1280 px and 390 px."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from appliance.db import open_engine, session_scope
from appliance.models import Batch, Endpoint, File, Task
from forwarder.worker import batches
from tests.forwarder.test_async_support import seed_endpoint
from tests.harness import ADMIN_KEY, Appliance, make_key, wait_until
from tests.web.browser import check_page, field_error, sign_in

EIGHT_GPUS = Path(__file__).resolve().parents[1] / "gpu" / "eight_h100.json"
SHOWN = "text/html,application/xhtml+xml,*/*;q=0.8"  # what a browser accepts for a page


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" (?:value|content)="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def browser_client(appliance: Appliance, key: str = ADMIN_KEY) -> httpx.Client:
    """A cookie-keeping client signed in through the form, as a browser would be."""
    client = httpx.Client(base_url=appliance.url, timeout=30)
    form = client.get("/ui/sign-in")
    reply = client.post(
        "/ui/sign-in", data={"csrf": csrf_of(form.text), "key": key, "next": "/ui/keys"}
    )
    assert reply.status_code == 303, reply.text
    return client


def test_session_cookie_csrf_and_revocation(make_appliance: Callable[..., Appliance]) -> None:
    appliance = make_appliance()
    client = httpx.Client(base_url=appliance.url, timeout=30)
    assert client.get("/ui/endpoints").headers["location"].startswith("/ui/sign-in")

    form = client.get("/ui/sign-in")
    token = csrf_of(form.text)
    forged = httpx.post(appliance.url + "/ui/sign-in", data={"csrf": token, "key": ADMIN_KEY})
    assert forged.status_code == 403  # a sign-in without the form's own cookie
    reply = client.post("/ui/sign-in", data={"csrf": token, "key": ADMIN_KEY, "next": "/ui/gpus"})
    assert reply.status_code == 303 and reply.headers["location"] == "/ui/gpus"
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert ADMIN_KEY not in cookie

    page = client.get("/ui/keys")
    assert page.status_code == 200
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    csrf = csrf_of(page.text)
    body = {"name": "forged", "scope_inference": "on"}
    assert client.post("/ui/keys", data=body).status_code == 403  # no token
    assert client.post("/ui/keys", data={**body, "csrf": "wrong"}).status_code == 403
    other_site = {"origin": "http://evil.example"}
    assert client.post("/ui/keys", data={**body, "csrf": csrf}, headers=other_site).status_code == (
        403
    )
    admin = appliance.client()
    names = [k["name"] for k in admin.get("/v1/api-keys").json()["api_keys"]]
    assert "forged" not in names

    # A session made with a key ends within a second of the key's revocation.
    made = client.post("/ui/keys", data={**body, "name": "laptop", "csrf": csrf})
    key_text = re.search(r'value="(mea_[^"]+)"', made.text)
    assert made.status_code == 200 and key_text
    second = httpx.Client(base_url=appliance.url, timeout=30)
    token = csrf_of(second.get("/ui/sign-in").text)
    second.post("/ui/sign-in", data={"csrf": token, "key": key_text.group(1)})
    assert second.get("/ui/tasks").status_code == 200
    key_id = next(
        k["id"] for k in admin.get("/v1/api-keys").json()["api_keys"] if k["name"] == "laptop"
    )
    assert admin.delete(f"/v1/api-keys/{key_id}").status_code == 200
    wait_until(lambda: second.get("/ui/tasks").status_code == 303, 2, "the session to end")

    # Sign-out ends the session server-side: the old cookie is worthless afterwards.
    old = dict(client.cookies)
    client.post("/ui/sign-out", data={"csrf": csrf})
    replay = httpx.Client(base_url=appliance.url, cookies=old)
    assert replay.get("/ui/keys").status_code == 303


def signed_in_cookie(appliance: Appliance, headers: dict[str, str]) -> str:
    """The session cookie a sign-in through the form sets, the form sent with `headers`."""
    client = httpx.Client(base_url=appliance.url, timeout=30, headers=headers)
    form = client.get("/ui/sign-in")
    token = csrf_of(form.text)
    # the form's own cookie, sent back by hand: a client on plain HTTP keeps no Secure cookie
    cookie = form.headers["set-cookie"].split(";", 1)[0]
    reply = client.post(
        "/ui/sign-in", data={"csrf": token, "key": ADMIN_KEY}, headers={"cookie": cookie}
    )
    assert reply.status_code == 303, reply.text
    return reply.headers["set-cookie"]


def test_session_cookie_is_secure_behind_a_trusted_tls_proxy(
    make_appliance: Callable[..., Appliance],
) -> None:
    """Behind a proxy that ends TLS, the api sees plain HTTP: the session cookie is Secure
    when a proxy the install trusts (APPLIANCE_FORWARDED_ALLOW_IPS) says the browser used
    https, and a client that is not such a proxy cannot say so for it."""
    tls = {"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7"}
    trusted = make_appliance(APPLIANCE_FORWARDED_ALLOW_IPS='["127.0.0.1"]')
    assert "Secure" in signed_in_cookie(trusted, tls)
    assert "Secure" not in signed_in_cookie(trusted, {})
    admin = trusted.client()
    made = admin.post("/v1/api-keys", json={"name": "via-proxy"}, headers=tls)
    assert made.status_code in (200, 201), made.text
    audit = admin.get("/v1/audit", params={"action": "key.create"}).json()["entries"]
    assert "203.0.113.7" in str(audit)  # the browser's address, not the proxy's

    elsewhere = make_appliance(APPLIANCE_FORWARDED_ALLOW_IPS='["10.1.2.3"]')
    assert "Secure" not in signed_in_cookie(elsewhere, tls)


def test_bad_input_shows_next_to_fields_and_creates_nothing(
    make_appliance: Callable[..., Appliance], page: Any
) -> None:
    appliance = make_appliance(APPLIANCE_GPU_INVENTORY_FILE=str(EIGHT_GPUS))
    base = appliance.url
    page.goto(base + "/ui/endpoints")
    check_page(page, "sign-in")
    page.fill("#f-key", "mea_000000000000_not-a-real-key")
    page.click("button[type=submit]")
    assert field_error(page, "key") == "That key was not accepted."
    check_page(page, "sign-in-error")
    sign_in(page, base, ADMIN_KEY)
    check_page(page, "endpoints-empty")

    page.click("text=New endpoint")
    check_page(page, "endpoint-new")
    page.fill("#f-name", "Not A Name")
    page.fill("#f-model", "missing.gguf")
    page.fill("#f-max_replicas", "-1")
    page.click("button.primary[type=submit]")
    assert "lowercase letters" in field_error(page, "name")
    assert field_error(page, "max_replicas") == "Must be 0 or more."
    check_page(page, "endpoint-new-errors")
    page.fill("#f-name", "fine-name")
    page.fill("#f-max_replicas", "1")
    page.click("button.primary[type=submit]")
    assert "does not exist in the models directory" in field_error(page, "model")
    assert page.input_value("#f-name") == "fine-name"  # what the user typed is kept
    page.fill("#f-model", "gemma-3-270m-q4_k_m.gguf")
    page.fill("#f-min_replicas", "3")
    page.click("button.primary[type=submit]")
    assert field_error(page, "min_replicas") == "Min replicas must not exceed Max replicas"
    assert appliance.client().get("/v1/model-endpoints").json()["model_endpoints"] == []

    page.click("nav >> text=API keys")
    page.fill("#f-name", "bad/name")
    page.click("#key-form button[type=submit]")
    assert "letters, digits" in field_error(page, "name")
    page.fill("#f-name", "ci")
    page.uncheck("input[name=scope_inference]")
    page.uncheck("input[name=scope_manage]")
    page.click("#key-form button[type=submit]")
    assert field_error(page, "scopes") == "Pick at least one scope."
    page.fill("#f-expires_days", "soon")
    page.check("input[name=scope_inference]")
    page.click("#key-form button[type=submit]")
    assert field_error(page, "expires") == "Enter a number of days."
    check_page(page, "keys-errors")
    names = [k["name"] for k in appliance.client().get("/v1/api-keys").json()["api_keys"]]
    assert names == ["admin"]

    page.click("nav >> text=GPUs")
    wait_until(lambda: page.reload() and page.locator(".gpu").count() == 8, 20, "8 GPU cards")
    assert "H100" in page.locator(".gpu").first.inner_text()
    check_page(page, "gpus-eight")
    page.click("nav >> text=Playground")
    assert "No endpoint to talk to yet" in page.inner_text("main")
    check_page(page, "playground-empty")
    page.click("nav >> text=Tasks")
    check_page(page, "tasks-empty")


def test_the_logs_page_carries_the_uis_security_headers(api_only: Appliance) -> None:
    """Container output is text a replica printed: served as the UI's pages are (nosniff, the
    same CSP), so a browser never runs it as a page or a script."""
    endpoint_id = seed_endpoint(api_only.data_dir, "logged", "127.0.0.1:9")
    client = browser_client(api_only)
    logs = client.get(f"/ui/endpoints/{endpoint_id}/logs")
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain")
    assert logs.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in logs.headers["content-security-policy"]


def test_a_bad_link_is_a_page_of_the_ui_not_raw_json(api_only: Appliance) -> None:
    """A query parameter a page cannot read (`/ui/audit?before=x`, `/ui/usage?granularity=week`),
    or a page that does not exist, answered raw JSON (FastAPI's 422, Starlette's 404) in the
    browser. Each is now the UI's page, with the menu and a line naming what was wrong; the
    playground's chat, which its script sends (accepting anything), still answers JSON."""
    client = browser_client(api_only)
    client.headers["accept"] = SHOWN
    long = "a" * 300
    for path, status, words in (
        ("/ui/audit?before=x", 422, "before"),
        ("/ui/audit?before=-1", 422, "before"),
        ("/ui/usage?granularity=week", 422, "granularity"),
        ("/ui/usage.csv?granularity=week", 422, "granularity"),
        (f"/ui/endpoints/new?model={long}", 422, "model"),
        (f"/ui/models?prune={long}", 422, "prune"),
        ("/ui/nothing-here", 404, "/ui/nothing-here"),
        ("/ui/keys/nope", 404, "/ui/keys/nope"),
    ):
        reply = client.get(path)
        assert reply.status_code == status, (path, reply.text)
        assert reply.headers["content-type"].startswith("text/html"), (path, reply.text)
        assert words in reply.text and 'href="/ui/endpoints"' in reply.text, (path, reply.text)
        assert reply.headers["x-frame-options"] == "DENY"
    chat = client.post(
        "/ui/playground/chat",
        json={"endpoint": "x", "messages": []},
        headers={"x-csrf-token": csrf_of(client.get("/ui/keys").text), "accept": "*/*"},
    )
    assert chat.status_code == 422 and chat.headers["content-type"] == "application/json"


def test_a_refused_form_or_link_is_a_page_of_the_ui_not_raw_json(api_only: Appliance) -> None:
    """A form sent from a stale tab (its security token gone), the sign-in form expired, an
    endpoint's logs link with an id that is not one: the browser showed raw JSON
    (`{"detail": ...}`). Each is now the UI's page saying the same words."""
    client = browser_client(api_only)
    client.headers["accept"] = SHOWN
    stale = client.post("/ui/keys", data={"name": "x", "csrf": "stale"})
    signin = httpx.post(
        api_only.url + "/ui/sign-in", data={"key": "x", "csrf": "stale"}, headers={"accept": SHOWN}
    )
    logs = client.get("/ui/endpoints/nope/logs")
    for reply, status, words in (
        (stale, 403, "security token is missing or stale"),
        (signin, 403, "the sign-in form expired"),
        (logs, 404, "no endpoint with id"),
    ):
        assert reply.status_code == status, reply.text
        assert reply.headers["content-type"].startswith("text/html"), reply.text
        assert words in reply.text and "<h1>" in reply.text, reply.text


def test_an_inference_key_lands_on_the_playground_and_sees_only_its_pages(
    api_only: Appliance,
) -> None:
    """A key with the inference scope alone signs in where it can work (the playground), its
    menu lists only the pages it may open, and a page it may not open says so as a page of
    the UI, with that menu, not as a bare JSON error."""
    key = make_key(api_only, "t1", scopes=("inference",))
    client = httpx.Client(base_url=api_only.url, timeout=30)
    entry = client.get("/ui", follow_redirects=True)  # what a browser does: /ui -> sign-in
    reply = client.post(
        "/ui/sign-in",
        data={"csrf": csrf_of(entry.text), "key": key, "next": "/ui/endpoints"},
    )
    assert reply.status_code == 303
    assert reply.headers["location"] == "/ui/playground"
    playground = client.get("/ui/playground")
    assert playground.status_code == 200
    menu = re.findall(r'<nav class="nav".*?</nav>', playground.text, re.S)[0]
    assert re.findall(r'href="(/ui/[a-z]+)"', menu) == ["/ui/playground", "/ui/tasks"]
    refused = client.get("/ui/endpoints")
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("text/html")
    assert "Not allowed" in refused.text and "lacks the &#39;manage&#39; scope" in refused.text
    assert 'href="/ui/playground"' in refused.text
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/playground"


def test_a_key_without_inference_reads_no_prompts_or_replies_on_the_pages(
    api_only: Appliance,
) -> None:
    """The API answers a key without the inference scope 403 on tasks, batches and files (a
    deploy key manages endpoints and never reads what was asked of them); the pages do the
    same: no tasks page in its menu, and the tasks page, a task's and a batch's say it is
    not allowed, with none of the prompt or the reply, while the team's other keys read them."""
    engine = open_engine(api_only.data_dir / "appliance.db")
    with session_scope(engine) as session:
        session.add(
            Batch(
                id="batch_p",
                owner="t1",
                created_by="t1-user",
                endpoint="/v1/completions",
                input_file_id="file_p",
            )
        )
        session.add(
            Task(
                id="tsk_p",
                endpoint_id="end_x",
                owner="t1",
                created_by="t1-user",
                status="SUCCESS",
                payload={"prompt": "the-secret-prompt"},
                result={"text": "the-secret-reply"},
                batch_id="batch_p",
            )
        )
    engine.dispose()
    deploy_key = make_key(api_only, "t1", scopes=("manage",))
    assert api_only.client(deploy_key).get("/v1/async-tasks/tsk_p").status_code == 403
    deployer = browser_client(api_only, deploy_key)
    menu = re.findall(r'<nav class="nav".*?</nav>', deployer.get("/ui/endpoints").text, re.S)[0]
    assert 'href="/ui/tasks"' not in menu
    for path in ("/ui/tasks", "/ui/tasks/tsk_p", "/ui/batches/batch_p"):
        refused = deployer.get(path)
        assert refused.status_code == 403, (path, refused.status_code)
        assert "lacks the &#39;inference&#39; scope" in refused.text, path
        assert "the-secret" not in refused.text, path
    reader = browser_client(api_only, make_key(api_only, "t1", scopes=("inference",)))
    assert "the-secret-prompt" in reader.get("/ui/tasks/tsk_p").text
    # a key that may open no page at all (a metrics scraper's) is told so, not given a 500
    scraper = browser_client(api_only, make_key(api_only, "t1", scopes=("admin",)))
    landed = scraper.get("/ui", follow_redirects=True)
    assert landed.status_code == 403 and "the-secret" not in landed.text
    assert "tsk_p" in reader.get("/ui/batches/batch_p").text


def test_an_empty_playground_offers_a_new_endpoint_only_to_a_key_that_may_make_one(
    api_only: Appliance,
) -> None:
    """With no endpoint to talk to, the playground of a key that may create endpoints links to
    the form; one with the inference scope alone, which that form would refuse, is told who
    can make an endpoint it may use instead."""
    admin = browser_client(api_only).get("/ui/playground").text
    assert "No endpoint to talk to yet" in admin and 'href="/ui/endpoints/new"' in admin
    key = make_key(api_only, "t1", scopes=("inference",))
    empty = browser_client(api_only, key).get("/ui/playground")
    assert empty.status_code == 200
    assert "No endpoint to talk to yet" in empty.text
    assert 'href="/ui/endpoints/new"' not in empty.text
    assert "manage" in empty.text and "public" in empty.text


def _key_form_body(client: httpx.Client, **fields: str) -> dict[str, str]:
    """The keys page's form as a browser sends it: its hidden fields and `fields`."""
    form = re.search(r'<form[^>]*id="key-form".*?</form>', client.get("/ui/keys").text, re.S)
    assert form is not None
    hidden = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form.group(0)))
    return {**hidden, "scope_inference": "on", **fields}


def test_a_key_form_sent_twice_makes_one_key(api_only: Appliance) -> None:
    """Reloading the page a new key is shown on sends its form again (the browser asks, the
    user agrees): that makes no second key, whose text nobody would ever see, and says so."""
    client = browser_client(api_only)
    body = _key_form_body(client, name="sent-twice")
    first = client.post("/ui/keys", data=body)
    assert first.status_code == 200 and 'id="new-key-text"' in first.text
    again = client.post("/ui/keys", data=body)
    assert 'id="new-key-text"' not in again.text
    assert "This form was already sent" in again.text
    listed = api_only.client().get("/v1/api-keys").json()["api_keys"]
    assert [k["name"] for k in listed].count("sent-twice") == 1


def test_a_key_without_a_name_is_asked_for_one(api_only: Appliance) -> None:
    """An empty name (or only spaces) is told to give one, on the keys page and the API, not
    the character rule meant for a name that has the wrong characters."""
    client = browser_client(api_only)
    for name in ("", "   "):
        page = client.post("/ui/keys", data=_key_form_body(client, name=name)).text
        said = re.search(r'data-error-for="name"[^>]*>(.*?)<', page, re.S)
        assert said is not None, "no message next to the name field"
        assert said.group(1).startswith("Give the key a name"), said.group(1)
    reply = api_only.client().post("/v1/api-keys", json={"name": ""})
    assert reply.status_code == 422 and "Give the key a name" in reply.text, reply.text
    page = client.post("/ui/keys", data=_key_form_body(client, name="no/slash")).text
    assert "Use letters, digits, spaces" in page  # a wrong character still gets the rule
    listed = api_only.client().get("/v1/api-keys").json()["api_keys"]
    assert not {"", "   ", "no/slash"} & {k["name"] for k in listed}


def test_a_key_forms_days_are_ascii_numbers(api_only: Appliance) -> None:
    """The expiry in days is a plain number: another script's digit (an Arabic-Indic one was
    a day), an underscore (1_0 was ten days) or an exponent is refused next to the field."""
    client = browser_client(api_only)

    def make(days: str) -> str:
        body = _key_form_body(client, name="odd-days", expires_days=days)
        return client.post("/ui/keys", data=body).text

    for days in ("\u0661", "1_0", "1e3"):
        assert "Enter a number of days." in make(days), days
    for days in ("-5", "0", "-0.5"):  # a number, but no time to come: "Enter a number" was wrong
        assert "Enter more than 0 days" in make(days), days
    for days in ("3661", "999999", "100000000"):  # past ten years: said in days, not seconds
        said = make(days)
        assert "Enter at most 3660 days" in said and "316224000" not in said, days
    listed = api_only.client().get("/v1/api-keys").json()["api_keys"]
    assert "odd-days" not in [k["name"] for k in listed]


def test_the_keys_page_says_when_a_key_expires(api_only: Appliance) -> None:
    made = api_only.client().post(
        "/v1/api-keys", json={"name": "short-lived", "expires_in_seconds": 3 * 86400}
    )
    assert made.status_code in (200, 201), made.text
    client = browser_client(api_only)
    row = re.search(r'<tr data-key="short-lived">.*?</tr>', client.get("/ui/keys").text, re.S)
    assert row is not None
    expires = time.strftime("%Y-%m-%d", time.gmtime(made.json()["expires_at"]))
    assert f"expires {expires}" in row.group(0)
    admin_row = re.search(r'<tr data-key="admin">.*?</tr>', client.get("/ui/keys").text, re.S)
    assert admin_row is not None and "expires" not in admin_row.group(0)  # made without one


def test_the_pages_say_both_frameworks_run_without_gpus(api_only: Appliance) -> None:
    """With 0 GPUs llama.cpp runs on the CPU, and so does vLLM (its CPU build): the form's
    hint does not send a vLLM user away, and an endpoint taking one request at a time says
    so in the singular."""
    client = browser_client(api_only)
    form = client.get("/ui/endpoints/new").text
    assert "0 runs on the CPU: llama.cpp, or vLLM&#39;s CPU build." in form
    endpoint_id = seed_endpoint(api_only.data_dir, "single", "127.0.0.1:9", endpoint_type="sync")
    engine = open_engine(api_only.data_dir / "appliance.db")
    with session_scope(engine) as session:
        row = session.get(Endpoint, endpoint_id)
        assert row is not None
        row.target_concurrency = 1
        session.add(row)
    engine.dispose()
    assert ", 1 request each<" in client.get(f"/ui/endpoints/{endpoint_id}").text


def test_the_min_replicas_hint_says_a_new_endpoint_at_zero_still_starts_one(
    api_only: Appliance,
) -> None:
    """Min replicas 0 does not mean none at first: a create (a restart, a rolling update)
    keeps one replica warm for the idle timeout, as docs/fields.md says; the hint said only
    "0 scales to zero when idle"."""
    form = browser_client(api_only).get("/ui/endpoints/new").text
    found = re.search(r'id="f-min_replicas".*?<p class="hint">(.*?)</p>', form, re.S)
    assert found is not None, "no hint under min replicas"
    hint = found.group(1)
    assert "keep one warm for the idle timeout" in hint, hint
    assert "scales to zero after the idle timeout" in hint, hint


def test_the_form_sets_and_edits_the_context_length(api_only: Appliance) -> None:
    """The endpoint form's context length is the request's max_model_len: set on create, shown
    and changed on edit, and an edit of another field keeps it."""
    client = browser_client(api_only)
    api = api_only.client()

    def context(endpoint_id: str) -> Any:
        got = api.get(f"/v1/model-endpoints/{endpoint_id}").json()["server_settings"]
        return got.get("max_model_len")

    form = {
        "name": "ctx", "framework": "llamacpp", "model": "gemma-3-270m-q4_k_m.gguf",
        "context": "1024", "gpus": "0", "min_replicas": "0", "max_replicas": "1",
        "concurrency": "2", "endpoint_type": "streaming",
    }  # fmt: skip
    page = client.get("/ui/endpoints/new").text
    made = client.post("/ui/endpoints/new", data=form | {"csrf": csrf_of(page)})
    assert made.status_code == 303, made.text
    assert context(api.get("/v1/llm/model-endpoints/ctx").json()["id"]) == 1024

    endpoint_id = seed_endpoint(api_only.data_dir, "ready", "127.0.0.1:9", endpoint_type="sync")
    engine = open_engine(api_only.data_dir / "appliance.db")
    with session_scope(engine) as session:
        row = session.get(Endpoint, endpoint_id)
        assert row is not None
        row.args = {"max_model_len": 4096}
        session.add(row)
    engine.dispose()
    for sent, wanted in (({"max_replicas": "2"}, 4096), ({"context": "2048"}, 2048)):
        edit = client.get(f"/ui/endpoints/{endpoint_id}/edit").text
        shown = re.search(r'name="context"[^>]*value="(\d*)"', edit)
        assert shown and shown.group(1) == str(context(endpoint_id)), edit
        values = dict(re.findall(r'name="(\w+)"[^>]*value="([^"]*)"', edit))
        saved = client.post(f"/ui/endpoints/{endpoint_id}/edit", data=values | sent)
        assert saved.status_code == 303, saved.text
        assert context(endpoint_id) == wanted
    edit = client.get(f"/ui/endpoints/{endpoint_id}/edit").text
    values = dict(re.findall(r'name="(\w+)"[^>]*value="([^"]*)"', edit))
    emptied = client.post(f"/ui/endpoints/{endpoint_id}/edit", data=values | {"context": ""})
    assert emptied.status_code == 422 and "not emptied" in emptied.text, emptied.text
    assert context(endpoint_id) == 2048  # said so, not silently kept


def test_a_cancelled_batchs_lines_read_cancelled_not_failed(api_only: Appliance) -> None:
    """A batch's lines a cancel ended count as neither completed nor failed: the tasks page and
    a line's own page say CANCELLED, while a line that did fail still says FAILURE."""
    engine = open_engine(api_only.data_dir / "appliance.db")
    with session_scope(engine) as session:
        for task_id, why in (("tsk_cut", batches.CANCELLED), ("tsk_bad", "replica said 500")):
            session.add(
                Task(
                    id=task_id,
                    endpoint_id="end_x",
                    owner="admin",
                    created_by="admin",
                    status="FAILURE",
                    payload={},
                    traceback=why,
                    batch_id="batch_x",
                )
            )
    engine.dispose()
    client = browser_client(api_only)
    listed = client.get("/ui/tasks").text
    rows = dict(
        re.findall(r'href="/ui/tasks/(tsk_\w+)".*?<span class="badge[^"]*">([^<]+)<', listed, re.S)
    )
    assert rows == {"tsk_cut": "CANCELLED", "tsk_bad": "FAILURE"}
    assert ">CANCELLED<" in client.get("/ui/tasks/tsk_cut").text


def test_a_batch_has_a_page_with_live_counts_its_lines_and_a_cancel(api_only: Appliance) -> None:
    """The tasks page links each batch to a page of its own: OpenAI's view of it with the
    counts as they are now (not as stored when it was made), its lines linking to their
    pages, and a cancel that ends the lines not yet answered. Another team's batch is a 404,
    and a batch that ended offers no cancel."""
    output = api_only.data_dir / "out.jsonl"
    output.write_bytes(b'{"custom_id": "line-tsk_a"}\n')
    engine = open_engine(api_only.data_dir / "appliance.db")
    with session_scope(engine) as session:
        session.add(
            File(id="file_out", owner="admin", created_by="admin", purpose="batch_output",
                 filename="batch_live_output.jsonl", bytes=output.stat().st_size,
                 path=str(output))
        )  # fmt: skip
        session.add(
            Batch(id="batch_live", owner="admin", created_by="admin", endpoint="/v1/completions",
                  input_file_id="file_in", output_file_id="file_out", status="in_progress",
                  request_counts={"total": 3, "completed": 0, "failed": 0},
                  metadata_={"purpose": "nightly"})
        )  # fmt: skip
        for task_id, status in (("tsk_a", "SUCCESS"), ("tsk_b", "PENDING"), ("tsk_c", "PENDING")):
            session.add(
                Task(id=task_id, endpoint_id="end_x", owner="admin", created_by="admin",
                     status=status, payload={"custom_id": f"line-{task_id}"},
                     batch_id="batch_live")
            )  # fmt: skip
    engine.dispose()
    client = browser_client(api_only)
    listed = client.get("/ui/tasks").text
    assert 'href="/ui/batches/batch_live"' in listed
    row = re.search(r"batch_live</a></td>.*?</tr>", listed, re.S)
    assert row and ">1 / 3<" in row.group(0), listed  # live: one line answered
    shown = client.get("/ui/batches/batch_live")
    assert shown.status_code == 200, shown.text
    assert "1 completed, 0 failed, of 3" in shown.text and "nightly" in shown.text
    assert all(f'href="/ui/tasks/{t}"' in shown.text for t in ("tsk_a", "tsk_b", "tsk_c"))
    assert ">line-tsk_b<" in shown.text  # each line by the custom_id its file gave it
    download = client.get("/ui/files/file_out/content")  # the output, from the browser
    assert download.content == output.read_bytes(), download.text
    assert download.headers["content-disposition"].startswith("attachment"), download.headers
    assert 'href="/ui/files/file_out/content"' in shown.text
    blue = browser_client(api_only, make_key(api_only, "blue"))
    assert blue.get("/ui/batches/batch_live").status_code == 404  # admin's team's, not blue's
    assert blue.get("/ui/files/file_out/content").status_code == 404
    own_csrf = csrf_of(blue.get("/ui/tasks").text)
    stays = blue.post("/ui/batches/batch_live/cancel", data={"csrf": own_csrf})
    assert stays.status_code == 404, stays.text

    cancelled = client.post("/ui/batches/batch_live/cancel", data={"csrf": csrf_of(shown.text)})
    assert cancelled.status_code == 303, cancelled.text
    after = api_only.client().get("/v1/batches/batch_live").json()
    assert after["status"] == "cancelling", after
    assert after["request_counts"] == {"total": 3, "completed": 1, "failed": 0}
    page = client.get("/ui/batches/batch_live").text
    assert page.count(">CANCELLED<") == 2
    engine = open_engine(api_only.data_dir / "appliance.db")
    with session_scope(engine) as session:
        ended = session.get(Batch, "batch_live")
        assert ended is not None and "Cancel batch" in page
        ended.status = "cancelled"  # as the sweeper marks it
        session.add(ended)
    engine.dispose()
    assert "Cancel batch" not in client.get("/ui/batches/batch_live").text
    refused = client.post("/ui/batches/batch_live/cancel", data={"csrf": "forged"})
    assert refused.status_code in (400, 403), refused.text


def test_an_admin_makes_a_teams_key_with_limits_on_the_keys_page(api_only: Appliance) -> None:
    """What the API lets an administrator set on a key (its team and user, admin, its four
    limits) the form sets too; the list shows each key's limits; a bad limit is shown next to
    its field with no key made; a non-admin's form has none of these fields, and sending them
    anyway is refused."""
    admin = api_only.client()
    client = browser_client(api_only)
    page = client.get("/ui/keys").text
    for name in ("team", "user", "admin", "requests_per_minute", "max_tokens_per_request"):
        assert f'name="{name}"' in page, name
    body = _key_form_body(
        client,
        name="team-b-ci",
        team="team-b",
        user="bob",
        requests_per_minute="60",
        max_concurrent_requests="",
        max_queued_tasks="0",
        max_tokens_per_request="256",
    )
    made = client.post("/ui/keys", data=body)
    assert made.status_code == 200 and 'id="new-key-text"' in made.text, made.text
    listed = {k["name"]: k for k in admin.get("/v1/api-keys").json()["api_keys"]}
    key = listed["team-b-ci"]
    assert (key["team"], key["user"], key["admin"]) == ("team-b", "bob", False)
    assert key["limits"] == {
        "requests_per_minute": 60,
        "max_concurrent_requests": None,
        "max_queued_tasks": 0,
        "max_tokens_per_request": 256,
    }
    row = re.search(r'<tr data-key="team-b-ci">.*?</tr>', client.get("/ui/keys").text, re.S)
    assert row is not None
    assert "bob · team-b" in row.group(0)
    assert "60 requests a minute" in row.group(0) and "256 tokens a request" in row.group(0)
    assert "no queued-task limit" in row.group(0)

    for value, says in (
        ("ten", "Enter a whole number"),
        ("-1", "Enter a whole number"),
        ("2000000000", "1000000000"),
    ):
        bad = client.post(
            "/ui/keys", data=_key_form_body(client, name="bad-limit", requests_per_minute=value)
        )
        assert bad.status_code == 422, value
        error = re.search(r'data-error-for="requests_per_minute">([^<]*)<', bad.text)
        assert error is not None and says in error.group(1), (value, bad.text)
    made_admin = client.post("/ui/keys", data=_key_form_body(client, name="ops", admin="on"))
    assert 'id="new-key-text"' in made_admin.text
    listed = {k["name"]: k for k in admin.get("/v1/api-keys").json()["api_keys"]}
    assert "bad-limit" not in listed and listed["ops"]["admin"] is True

    member = make_key(api_only, "team-a")
    theirs = browser_client(api_only, member)
    page = theirs.get("/ui/keys").text
    for name in ("team", "user", "admin", "requests_per_minute"):
        assert f'name="{name}"' not in page, name
    refused = theirs.post("/ui/keys", data=_key_form_body(theirs, name="sneak", team="team-b"))
    assert refused.status_code == 422
    assert "only an administrator may make keys for other users or teams" in refused.text
    refused = theirs.post(
        "/ui/keys", data=_key_form_body(theirs, name="sneak", requests_per_minute="0")
    )
    assert "only an administrator may set a key&#39;s limits" in refused.text
    listed = {k["name"] for k in admin.get("/v1/api-keys").json()["api_keys"]}
    assert "sneak" not in listed


def test_a_key_keeps_its_newest_ui_sessions_and_no_more(api_only: Appliance) -> None:
    """Each sign-in keeps a session in Redis for 12 hours: one key signing in again and again
    (290 a second here) filled Redis, which every team's queues share. A key keeps its newest
    UI_SESSIONS_PER_KEY; a sign-in past them signs out its oldest, no other key's."""
    import redis as redis_lib

    from api import ui_session

    most = ui_session.UI_SESSIONS_PER_KEY
    red = make_key(api_only, "red")
    blue = browser_client(api_only, make_key(api_only, "blue"))
    browsers = [browser_client(api_only, red) for _ in range(most + 3)]
    signed_in = [b.get("/ui/keys").status_code == 200 for b in browsers]
    assert signed_in == [False] * 3 + [True] * most
    assert blue.get("/ui/keys").status_code == 200
    store = redis_lib.Redis.from_url(api_only.redis.url)
    assert len(list(store.scan_iter("appliance:ui:session:*"))) == most + 1
    csrf = csrf_of(browsers[-1].get("/ui/keys").text)
    assert browsers[-1].post("/ui/sign-out", data={"csrf": csrf}).status_code == 303
    again = browser_client(api_only, red)  # room for one without ending another
    assert [b.get("/ui/keys").status_code == 200 for b in (again, browsers[3])] == [True, True]

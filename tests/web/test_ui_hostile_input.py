"""The UI against a signed-in browser's hostile input: a link that would steer a page's own
script to another page of the team's, and security tokens no form of ours would send."""

from __future__ import annotations

import httpx

from tests.harness import Appliance
from tests.web.test_forms_and_sign_in import SHOWN, browser_client, csrf_of


def test_a_prune_link_polls_the_prune_and_nothing_else(api_only: Appliance) -> None:
    """`/ui/models?prune=<id>` makes the page poll `/ui/models/prune/<id>` and draw the reply
    into itself. The id was put into that URL as given, so a link with `../../tasks/...`
    (or any page of the team's) had the victim's page fetch another page, or a replica's log
    text, and insert it as HTML. Now a prune id that is not one is a bad link."""
    client = browser_client(api_only)
    client.headers["accept"] = SHOWN
    for steered in ("../../tasks", "../../endpoints/end_x/logs", "prune_1/../../x", "a?b"):
        reply = client.get("/ui/models", params={"prune": steered})
        assert reply.status_code == 422, (steered, reply.text)
        assert "data-poll" not in reply.text and "prune" in reply.text
    shaped = client.get("/ui/models", params={"prune": "prune_1k8ome4v3ccc81380b7"})
    assert shaped.status_code == 200
    assert 'data-poll="/ui/models/prune/prune_1k8ome4v3ccc81380b7"' in shaped.text


def test_a_security_token_with_other_characters_is_refused_not_an_error(
    api_only: Appliance,
) -> None:
    """A form's or a script's CSRF token, or the sign-in form's, with a character outside
    ASCII (a hand-made request; no page of ours sends one) was an internal error (500, a
    traceback in the log) on every form of the UI. Now it is refused as a stale token is."""
    client = browser_client(api_only)
    client.headers["accept"] = SHOWN
    assert csrf_of(client.get("/ui/keys").text)
    for token in ("é", "\U0001f4a9", "tok\u00ffen"):
        form = client.post("/ui/keys", data={"name": "x", "scope_inference": "on", "csrf": token})
        assert form.status_code == 403, (token, form.text)
        assert "security token is missing or stale" in form.text
        gone = client.post("/ui/endpoints/end_x/delete", data={"csrf": token})
        assert gone.status_code == 403, (token, gone.text)
    header = client.post("/ui/sign-out", headers={"x-csrf-token": b"tok\xe9n"})
    assert header.status_code == 403, header.text
    assert client.get("/ui/keys").status_code == 200  # still signed in

    anonymous = httpx.Client(base_url=api_only.url, timeout=30, headers={"accept": SHOWN})
    token = csrf_of(anonymous.get("/ui/sign-in").text)
    for sent in ("é", token + "é"):
        signin = anonymous.post("/ui/sign-in", data={"csrf": sent, "key": "mea_x"})
        assert signin.status_code == 403, (sent, signin.text)
        assert "the sign-in form expired" in signin.text
    # the sign-in form's own cookie, altered by hand to hold such a character
    cookie = {"cookie": b"mea_signin=\xc3\xa9", "accept": SHOWN.encode()}
    altered = httpx.post(
        api_only.url + "/ui/sign-in", data={"csrf": "é", "key": "mea_x"}, headers=cookie
    )
    assert altered.status_code == 403, altered.text
    assert "the sign-in form expired" in altered.text

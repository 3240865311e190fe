"""The UI against a signed-in browser's hostile input: a link that would steer a page's own
script to another page of the team's, and security tokens no form of ours would send."""

from __future__ import annotations

from tests.harness import Appliance
from tests.web.test_forms_and_sign_in import SHOWN, browser_client


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

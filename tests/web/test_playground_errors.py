"""The playground when a request cannot be answered: the session ended in another tab, or
the request was refused. The page says why, and the prompt is back in the box to send again."""

from __future__ import annotations

from typing import Any

from tests.forwarder.test_async_support import seed_endpoint
from tests.harness import ADMIN_KEY, Appliance, wait_until
from tests.web.browser import sign_in


def open_playground(page: Any, appliance: Appliance) -> None:
    """The playground with one endpoint to choose (its replica is never reached here)."""
    seed_endpoint(appliance.data_dir, "chatty", "127.0.0.1:9", endpoint_type="streaming")
    sign_in(page, appliance.url, ADMIN_KEY)

    def listed() -> bool:
        page.goto(appliance.url + "/ui/playground")
        return bool(page.locator("#p-endpoint").count())

    wait_until(listed, 20, "the endpoint to be routed", every_s=1)


def last_bubble(page: Any) -> tuple[str, str]:
    bubble = page.locator("[data-messages] > *").last
    return str(bubble.get_attribute("class")), str(bubble.inner_text())


def test_a_chat_after_signing_out_elsewhere_says_to_sign_in_and_keeps_the_prompt(
    api_only: Appliance, page: Any
) -> None:
    open_playground(page, api_only)
    other = page.context.new_page()  # the same browser signs out in another tab
    other.goto(api_only.url + "/ui/endpoints")
    other.click("text=Sign out")
    other.wait_for_url("**/ui/sign-in**")

    page.fill("[data-composer] textarea", "Write a haiku about ports.")
    page.click("[data-send]")
    page.wait_for_selector(".msg-error")
    kind, text = last_bubble(page)
    assert kind == "msg-error" and "sign in again" in text, (kind, text)
    assert page.input_value("[data-composer] textarea") == "Write a haiku about ports."
    assert page.locator(".msg-assistant").count() == 0  # no empty answer left behind


def test_a_refused_chat_names_the_field_and_keeps_the_prompt(
    api_only: Appliance, page: Any
) -> None:
    open_playground(page, api_only)
    page.fill("#p-max-tokens", "99999999")
    page.fill("[data-composer] textarea", "Name three rivers.")
    page.click("[data-send]")
    page.wait_for_selector(".msg-error")
    kind, text = last_bubble(page)
    assert kind == "msg-error" and "Max tokens" in text, (kind, text)
    assert page.input_value("[data-composer] textarea") == "Name three rivers."

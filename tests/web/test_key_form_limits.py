"""The keys page's limits: a number past the largest limit is told the largest, not asked
for "a whole number" (which it is) nor answered in pydantic's words."""

from __future__ import annotations

import html
import re

from tests.harness import Appliance
from tests.web.test_forms_and_sign_in import _key_form_body, browser_client


def test_a_limit_past_the_largest_says_the_largest(api_only: Appliance) -> None:
    client = browser_client(api_only)

    def said(field: str, value: str) -> str:
        body = _key_form_body(client, name="big-limit", **{field: value})
        page = client.post("/ui/keys", data=body).text
        found = re.search(rf'data-error-for="{field}"[^>]*>(.*?)<', page, re.S)
        assert found is not None, f"no message next to {field}"
        return html.unescape(found.group(1)).strip()

    for value in ("1000000001", "999999999999", "99999999999999999999999"):
        for field in ("requests_per_minute", "max_tokens_per_request"):
            message = said(field, value)
            assert message.startswith("Enter at most 1000000000"), (field, value, message)
    for value in ("1.5", "-1", "ten"):  # not a whole number: still said so
        assert said("max_queued_tasks", value).startswith("Enter a whole number"), value
    listed = api_only.client().get("/v1/api-keys").json()["api_keys"]
    assert "big-limit" not in [k["name"] for k in listed]

"""The README documents every setting with its default, exactly as the code defines them."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from appliance.settings import Settings, settings_table
from tests.harness import ADMIN_KEY, Appliance

README = Path(__file__).parents[2] / "README.md"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_readme_settings_table_matches_the_settings() -> None:
    text = README.read_text()
    start, end = "<!-- settings-table:start -->\n", "\n<!-- settings-table:end -->"
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table == settings_table(), "run `appliance settings` and paste it into the README"
    for name in Settings.model_fields:
        assert f"`APPLIANCE_{name.upper()}`" in table


def test_readme_opens_with_the_two_commands() -> None:
    lines = [line for line in README.read_text().splitlines() if line.strip()][:4]
    assert lines[1] == "```sh"
    assert lines[2].startswith("docker compose up -d")
    assert lines[3].startswith("scripts/test")


DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]
# a route in backticks, with its method when the docs give one: `POST /v1/files`, `/v1/usage`
ROUTE = re.compile(
    r"(?:\b(GET|POST|PUT|DELETE|HEAD) )?(/(?:v1|v2|healthz|readyz|metrics)[\w/{}.\-]*)"
)
# Routes the docs name as not served here: each answers 404 saying so (the README's table)
NOT_SERVED = (
    "/v1/llm/fine-tunes",
    "/v1/docker-image-batch-jobs",
    "/v1/batch-jobs",
    "/v1/model-bundles",
    "/v1/triggers",
)


def documented_routes() -> dict[tuple[str | None, str], set[str]]:
    """Every route README.md and docs/*.md name in code spans, with the files naming it."""
    found: dict[tuple[str | None, str], set[str]] = {}
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", doc.read_text()):
            for method, path in ROUTE.findall(span):
                if path in ("/v1", "/v2") or "..." in path:
                    continue
                found.setdefault((method or None, path), set()).add(doc.name)
    return found


def test_every_route_the_docs_name_is_served(api_only: Appliance) -> None:
    """A route the README or a doc tells a user to call exists, with that method, in the live
    /openapi.json (a `{param}` or a concrete name in its place), or is one the docs say is
    not served, which answers 404 saying so; a route that moved or was renamed fails here."""
    paths = httpx.get(api_only.url + "/openapi.json").json()["paths"]
    served = [
        (re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$"), ops)
        for p, ops in paths.items()
    ]
    documented = documented_routes()
    assert len(documented) > 40, "the route pattern no longer reads the docs"
    wrong = []
    for (method, path), where in sorted(documented.items(), key=str):
        concrete = re.sub(r"\{[^}]*\}", "x", path)
        if path.endswith("/"):  # a prefix: `/v1/llm/model-endpoints/{name}/files/`
            concrete += "x"
        if path in NOT_SERVED:
            reply = httpx.get(api_only.url + path, headers=ADMIN)
            assert reply.status_code == 404 and "not available" in reply.text, (path, reply.text)
            continue
        methods = [ops for pattern, ops in served if pattern.match(concrete)]
        if not methods or (method and not any(method.lower() in ops for ops in methods)):
            wrong.append(f"{method or ''} {path} ({', '.join(sorted(where))})".strip())
    assert not wrong, f"the docs name routes the api does not serve: {wrong}"


def test_every_endpoint_field_is_documented_and_every_documented_field_exists(
    api_only: Appliance,
) -> None:
    """docs/fields.md names every field an endpoint's create and update take, and names none
    they do not (a renamed or dropped field fails here)."""
    schemas = httpx.get(api_only.url + "/openapi.json").json()["components"]["schemas"]
    create = set(schemas["CreateLLMEndpointRequest"]["properties"])
    update = set(schemas["UpdateLLMEndpointRequest"]["properties"])
    text = (README.parent / "docs/fields.md").read_text()
    # the field tables: from the first section to the one on what an endpoint's GET adds
    tables = text[text.index("## Endpoint and model") : text.index("## What an endpoint's GET")]
    named = {
        name
        for line in tables.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z_]+)`", line.split("|")[1])
    }
    assert named - (create | update) == set(), "docs/fields.md names fields the api lacks"
    assert (create | update) - named == set(), "fields the api takes that docs/fields.md lacks"

"""Schemathesis over the api's own OpenAPI document: with a valid key no request it generates
gets a 5xx or an answer that breaks the schema; without a key every one gets a 401."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx

from forwarder.paths import PATHS
from tests.api.test_keys import OPEN_ROUTES
from tests.harness import ADMIN_KEY, Appliance

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
COMMON = [
    "--seed",
    "1",
    "--workers",
    "1",
    "--request-timeout",
    "10",
    "--suppress-health-check",
    "all",
    "--exclude-path-regex",
    "^/ui|/logs$",
    "--phases",
    "examples,coverage,fuzzing",
]


def schemathesis(appliance: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCHEMATHESIS, "run", appliance.url + "/openapi.json", *COMMON, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_with_a_key_no_server_error_and_every_answer_fits_the_schema(api_only: Appliance) -> None:
    run = schemathesis(
        api_only,
        "-H",
        f"Authorization: Bearer {ADMIN_KEY}",
        "-n",
        "15",
        "--checks",
        "not_a_server_error,response_schema_conformance,"
        "status_code_conformance,content_type_conformance",
    )
    assert run.returncode == 0, run.stdout[-6000:]
    assert " passed" in run.stdout


def test_without_a_key_everything_but_health_is_401(api_only: Appliance, tmp_path: Path) -> None:
    har = tmp_path / "calls.har"
    run = schemathesis(
        api_only,
        "-n",
        "5",
        "--checks",
        "not_a_server_error",
        "--report",
        "har",
        "--report-har-path",
        str(har),
    )
    assert run.returncode == 0, run.stdout[-6000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    assert len(entries) > 50
    unauthorized = 0
    for entry in entries:
        path = "/" + entry["request"]["url"].split("/", 3)[3].split("?")[0]
        status = entry["response"]["status"]
        if path in OPEN_ROUTES:
            continue
        # 405 answers a method the route does not have at all (schemathesis tries those too)
        method = entry["request"]["method"]
        assert status == 401 or (status == 405 and method not in documented(api_only, path)), (
            method,
            path,
            status,
        )
        unauthorized += status == 401
    assert unauthorized > 50


def documented(appliance: Appliance, concrete: str) -> set[str]:
    """The methods the schema gives the route that `concrete` (ids filled in) belongs to."""
    paths = httpx.get(appliance.url + "/openapi.json").json()["paths"]
    for template, operations in paths.items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, concrete):
            return {method.upper() for method in operations}
    return set()


def test_every_inference_route_is_documented_with_its_models(api_only: Appliance) -> None:
    document = httpx.get(api_only.url + "/openapi.json").json()
    for entry in PATHS:
        operation = document["paths"][entry.path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert "$ref" in body, entry.path  # a named model: OpenAI's or LLM Engine's
        reply = operation["responses"]["200"]["content"]
        assert "$ref" in reply["application/json"]["schema"], entry.path
        if entry.stream != 0:
            assert "text/event-stream" in reply, entry.path
        if entry.selector != "model":
            assert any(p["name"] == entry.selector for p in operation["parameters"])
        assert {"401", "404", "429"} <= set(operation["responses"]), entry.path


def test_the_reference_pages_load_fixed_releases_of_their_scripts(api_only: Appliance) -> None:
    """/docs and /redoc, open to all, run on the appliance's origin: their scripts are pinned
    releases, not FastAPI's floating `@5`/`@2` (a later publish would run there unseen), and
    ReDoc asks no third party for fonts."""
    swagger = httpx.get(api_only.url + "/docs")
    assert swagger.status_code == 200, swagger.text
    assert "swagger-ui-dist@5.17.14/swagger-ui-bundle.js" in swagger.text
    assert "/openapi.json" in swagger.text and "@5/" not in swagger.text
    redoc = httpx.get(api_only.url + "/redoc")
    assert redoc.status_code == 200, redoc.text
    assert "redoc@2.1.3/bundles/redoc.standalone.js" in redoc.text
    assert "@2/" not in redoc.text and "fonts.googleapis.com" not in redoc.text


def test_a_bad_endpoint_name_is_refused_in_words(api_only: Appliance) -> None:
    """LLM Engine's client shows the 400's detail as it is: the rule in words, not the pattern
    it is checked with; the schema still carries the pattern for generated clients."""
    body = {"name": "Bad_Name", "model_name": "m", "inference_framework": "vllm"}
    refused = api_only.client().post("/v1/llm/model-endpoints", json=body)
    assert refused.status_code == 400, refused.text
    said = refused.json()["detail"]
    assert "lowercase letters, digits and dashes" in said and "[a-z" not in said, said
    schema = api_only.client().get("/openapi.json").json()["components"]["schemas"]
    assert schema["CreateLLMEndpointRequest"]["properties"]["name"]["pattern"].startswith("^")

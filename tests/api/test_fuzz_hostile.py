"""Property tests of every management route that takes a body: huge and tiny numbers, NaN and
infinity, deep and huge bodies, bad UTF-8 and long strings, alone or in an otherwise valid
request, never get a 5xx and never cost the client its keep-alive connection; nor does any
value of a query parameter (numbers past any float, non-ASCII digits, bad percent escapes).
Prints how many cases ran. (tests/api/test_schema.py runs Schemathesis over the same routes.)"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.schemas import CreateLLMEndpointRequest
from forwarder.paths import PATHS
from tests.api.test_hostile import mark_ready
from tests.harness import ADMIN_KEY, Appliance

EDGE_NUMBERS = [0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30]
EDGE_NUMBERS += [10**400, -(10**400)]  # past any float: digits Python's float() refuses
EDGE_FLOATS = [1e308, -1e308, 5e-324, -0.0, 1e30, float("nan"), float("inf"), float("-inf")]
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_NUMBERS),
    st.sampled_from(EDGE_FLOATS),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-1", "8Gi", "500m", "x" * 100_000]),
    # numbers as strings no JSON number is, a lone surrogate (json.dumps writes it escaped), NUL
    st.sampled_from(["1e999", "NaN", "-0.0", "\u0661\u0662\u0663", "1" + "0" * 400]),
    st.sampled_from(["\ud800", "a\x00b", "\udfff\ud800"]),
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = sorted(CreateLLMEndpointRequest.model_fields)
VALID = {
    "name": "fz-new",
    "model_name": "acme/standin-1b",
    "inference_framework": "vllm",
    "gpus": 0,
    "min_workers": 0,
    "max_workers": 1,
}


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity as Python writes them


raw_bodies = st.sampled_from(
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"name": "\xff\xfe\xfd", "model_name": "\xc3\x28"}',
        b"\xff" * 1000,
        b'{"name": "' + b"x" * 1_000_000 + b'"}',
        b"",
        b"{",
        b'{"name": NaN, "model_name": Infinity}',
        b"1e99999",
        b'{"name": "a", "name": "b", "gpus": 0, "gpus": ' + b"1" + b"0" * 400 + b"}",
        b'{"gpus": -' + b"9" * 400 + b', "max_workers": 1e308, "min_workers": 5e-324}',
        b'{"name": "\\ud800", "model_name": "a\\u0000b"}',
        b"null",
    ]
)
mutated = st.builds(
    lambda field, value: as_json({**VALID, field: value}),
    st.sampled_from(FIELDS),
    st.one_of(st.sampled_from(EDGE_NUMBERS + EDGE_FLOATS), leaves, values),
)
bodies = st.one_of(mutated, mutated, mutated, values.map(as_json), raw_bodies)


def body_routes(appliance: Appliance, names: dict[str, str]) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI document that takes a JSON body, path parameters
    filled with an endpoint that exists; the inference routes are another test's."""
    document = httpx.get(appliance.url + "/openapi.json").json()
    inference = {p.path for p in PATHS}
    routes = []
    for path, operations in document["paths"].items():
        if path in inference or path.startswith(("/ui", "/v1/files")):
            continue
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                for param, value in names.items():
                    path = path.replace("{" + param + "}", value)
                routes.append((method.upper(), path))
    return routes


def test_no_body_gets_a_server_error(api_only: Appliance) -> None:
    admin = api_only.client()
    made = admin.post("/v1/llm/model-endpoints", json={**VALID, "name": "fz"})
    assert made.status_code == 200, made.text
    mark_ready(api_only)
    eid = made.json()["endpoint_creation_task_id"]
    names = {"name": "fz", "model_endpoint_id": eid, "endpoint_id": eid}
    routes = body_routes(api_only, {**names, "key_id": "key_x", "batch_id": "batch_x"})
    assert len(routes) >= 5, routes
    cases = 0
    seen: Counter[int] = Counter()
    client = httpx.Client(base_url=api_only.url, headers={"authorization": f"Bearer {ADMIN_KEY}"})

    @settings(
        max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(route=st.sampled_from(routes), body=bodies)
    def check(route: tuple[str, str], body: bytes) -> None:
        nonlocal cases
        cases += 1
        method, path = route
        body = body.replace(b'"fz-new"', b'"fz-%d"' % cases)  # a new name: stored, if valid
        reply = client.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
        seen[reply.status_code] += 1
        assert reply.status_code < 500, (method, path, body[:200], reply.text[:500])
        if reply.status_code in (400, 422):
            json.loads(reply.content)  # strict JSON, whatever was echoed back

    try:
        check()
    finally:
        client.close()
    print(f"{cases} cases over {len(routes)} routes, no 5xx; statuses {dict(seen)}; {routes}")
    assert api_only.client().get("/healthz").status_code == 200


query_values = st.one_of(
    st.sampled_from([str(n) for n in EDGE_NUMBERS] + [repr(f) for f in EDGE_FLOATS]),
    st.sampled_from(["1e999", "-1e999", "NaN", "\u0661\u0662\u0663", "-0", "true", "[]", "{}"]),
    st.sampled_from(["%ED%A0%80", "a%00b", "%FF", "x" * 10_000]),
    st.text(max_size=20),
)


def test_no_query_gets_a_server_error(api_only: Appliance) -> None:
    """Every query parameter of the OpenAPI document, numbers past any float and strings no
    number is among them, gets no 5xx."""
    document = httpx.get(api_only.url + "/openapi.json").json()
    inference = {p.path for p in PATHS}
    queries = [
        (method.upper(), path, parameter["name"])
        for path, operations in document["paths"].items()
        if path not in inference and "{" not in path
        for method, operation in operations.items()
        for parameter in operation.get("parameters", [])
        if parameter.get("in") == "query"
    ]
    assert len(queries) >= 5, queries
    client = httpx.Client(base_url=api_only.url, headers={"authorization": f"Bearer {ADMIN_KEY}"})

    @settings(
        max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(query=st.sampled_from(queries), value=query_values)
    def check(query: tuple[str, str, str], value: str) -> None:
        method, path, name = query
        reply = client.request(method, f"{path}?{name}={quote(value, safe='%')}")
        assert reply.status_code < 500, (method, path, name, value[:200], reply.text[:500])

    try:
        check()
    finally:
        client.close()
    print(f"{len(queries)} query parameters, no 5xx: {queries}")

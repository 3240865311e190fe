"""Tenancy, swept over every route rather than a list: team red makes one of each object a
route can name, then team blue calls every path of the live `/openapi.json` that takes a path
parameter (every method it lists) and every `/ui` route that does, with red's object in the
parameter, and every operation with a query parameter naming an object, with red's there.
Blue must get what it gets for an object that does not exist: the same status and words (no
2xx, 403 for an administrator's route), nothing of red's. A parameter no object is mapped to
fails the sweep: a new route has to say here which object it names."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from fastapi import APIRouter
from starlette.routing import BaseRoute

from api.routes import ui
from tests.api.test_storage import GGUF, LIMIT_BYTES, fake_hub_repo, started_store, upload
from tests.api.test_storage_model_tenancy import endpoint_on
from tests.api.test_team_limits import signed_in
from tests.api.test_tenancy import make_objects, team_key
from tests.harness import Appliance
from tests.web.test_forms_and_sign_in import csrf_of

# (path, parameter) -> the objects of red's to put there, each tried in turn
PATH_OBJECTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("/v1/async-tasks/{task_id}", "task_id"): ("task",),
    ("/v1/llm/model-endpoints/{name}", "name"): ("endpoint name", "public endpoint name"),
    ("/v1/llm/model-endpoints/{name}/files/{path}", "name"): ("local endpoint name",),
    ("/v1/llm/model-endpoints/{name}/files/{path}", "path"): ("model file",),
    ("/v1/model-endpoints/{endpoint_id}", "endpoint_id"): ("endpoint",),
    ("/v1/model-endpoints/{endpoint_id}/restart", "endpoint_id"): ("endpoint",),
    ("/v1/model-endpoints/{endpoint_id}/events", "endpoint_id"): ("endpoint",),
    ("/v1/model-endpoints/{endpoint_id}/logs", "endpoint_id"): ("endpoint",),
    ("/v1/storage/hf-downloads/{repository}", "repository"): ("hf download",),
    ("/v1/api-keys/{key_id}", "key_id"): ("key",),
    ("/v1/models/{model}", "model"): ("endpoint name",),
    ("/v2/models/{model}", "model"): ("endpoint name",),
    ("/v1/files/{file_id}", "file_id"): ("file",),
    ("/v1/files/{file_id}/content", "file_id"): ("file",),
    ("/v1/batches/{batch_id}", "batch_id"): ("batch",),
    ("/v1/batches/{batch_id}/cancel", "batch_id"): ("batch",),
    ("/v2/batch-completions/{job_id}", "job_id"): ("batch completions",),
    ("/v2/batch-completions/{job_id}/actions/cancel", "job_id"): ("batch completions",),
    ("/v1/storage/model-files/{name}", "name"): ("model file",),
    ("/v1/storage/hf-models/{repo_id}", "repo_id"): ("hf model",),
    ("/v1/storage/images/prune/{prune_id}", "prune_id"): ("prune",),
    # the UI's (include_in_schema=False: from the UI's router)
    ("/ui/endpoints/{endpoint_id}", "endpoint_id"): ("endpoint",),
    ("/ui/endpoints/{endpoint_id}/live", "endpoint_id"): ("endpoint",),
    ("/ui/endpoints/{endpoint_id}/logs", "endpoint_id"): ("endpoint",),
    ("/ui/endpoints/{endpoint_id}/edit", "endpoint_id"): ("endpoint",),
    ("/ui/endpoints/{endpoint_id}/delete", "endpoint_id"): ("endpoint",),
    ("/ui/batches/{batch_id}", "batch_id"): ("batch", "batch completions"),
    ("/ui/batches/{batch_id}/cancel", "batch_id"): ("batch",),
    ("/ui/files/{file_id}/content", "file_id"): ("file",),
    ("/ui/tasks/{task_id}", "task_id"): ("task",),
    ("/ui/models/files/{name}", "name"): ("model file",),
    ("/ui/models/files/{name}/delete", "name"): ("model file",),
    ("/ui/models/hf/{repo_id}/delete", "repo_id"): ("hf model",),
    ("/ui/models/prune/{prune_id}", "prune_id"): ("prune",),
    ("/ui/keys/{key_id}/revoke", "key_id"): ("key",),
}
# query parameter -> the object of red's it names, or None where it names none
QUERY_OBJECTS: dict[str, str | None] = {
    "model_endpoint_id": "endpoint",
    "model_endpoint_name": "endpoint name",
    "name": "endpoint name",  # a list's filter: blue's list stays empty
    "team": "team",
    "endpoint": "endpoint name",
    "key": "key",
    "actor": "key",
    "target": "endpoint",
    **dict.fromkeys(
        (
            *("order_by", "limit", "tail", "follow", "replica_id", "revision", "after", "order"),
            *("purpose", "from", "to", "granularity", "format", "action", "before", "prune"),
            *("dry_run", "overwrite"),
        )
    ),
}
# A body that passes validation, for each operation that takes one
TASK = {"args": {"prompt": "x", "max_tokens": 1}}
COMPLETION = {"prompt": "x", "max_new_tokens": 1, "temperature": 0}
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PUT", "/v1/llm/model-endpoints/{name}"): {"json": {"max_workers": 2}},
    ("PUT", "/v1/model-endpoints/{endpoint_id}"): {"json": {"max_workers": 2}},
    ("PUT", "/v1/storage/model-files/{name}"): {"content": GGUF},
    ("PUT", "/ui/models/files/{name}"): {"content": GGUF},
    ("POST", "/v1/async-tasks"): {"json": TASK},
    ("POST", "/v1/sync-tasks"): {"json": TASK},
    ("POST", "/v1/streaming-tasks"): {"json": TASK},
    ("POST", "/v1/llm/completions-sync"): {"json": COMPLETION},
    ("POST", "/v1/llm/completions-stream"): {"json": COMPLETION},
}
# Objects of the box's (an administrator made them) that every team with `manage` reads, with
# red's part (the endpoints using an image) left out: only that part must not show
SHARED = {"prune"}
# A model file's name is one in a directory every team shares: an upload under a name another
# team holds is refused (409, without naming the team), where a free name is blue's to take.
CREATES = {("PUT", "/v1/storage/model-files/{name}"), ("PUT", "/ui/models/files/{name}")}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Appliance]:
    with started_store(tmp_path, LIMIT_BYTES) as appliance:
        yield appliance


def red_objects(store: Appliance, admin: httpx.Client, red: httpx.Client) -> dict[str, str]:
    """One of each object red's key can make, and the box's own where only an admin can."""
    ids = make_objects(red)
    assert upload(red, "red-tune.gguf", GGUF).status_code == 201
    local = red.post("/v1/llm/model-endpoints", json=endpoint_on("red-local", "red-tune.gguf"))
    assert local.status_code == 200, local.text
    asked = red.post("/v1/storage/hf-downloads", json={"repository": "acme/red-1b"})
    assert asked.status_code == 202, asked.text
    fake_hub_repo(Path(store.env()["APPLIANCE_HF_CACHE_DIR"]) / "hub", "acme/red-1b", b"w" * 99)
    job = red.post(
        "/v2/batch-completions",
        json={
            "model_config": {"model": "red-private"},
            "content": {"prompts": ["a"], "max_new_tokens": 1, "temperature": 0},
            "output_data_path": "red-out",
        },
    )
    assert job.status_code == 200, job.text
    prune = admin.post("/v1/storage/images/prune")
    assert prune.status_code == 202, prune.text
    return {
        **ids,
        "endpoint name": "red-private",
        "public endpoint name": "red-public",
        "local endpoint name": "red-local",
        "model file": "red-tune.gguf",
        "hf download": "acme/red-1b",
        "hf model": "acme/red-1b",
        "batch completions": job.json()["job_id"],
        "prune": prune.json()["id"],
        "team": "red",
    }


def missing(value: str) -> str:
    """A value of the same shape that names nothing: the letters and digits of its last six
    (before an extension) turned, each within its class (hex digits stay hex)."""
    stem, dot, ext = value.rpartition(".") if re.search(r"\.[a-z]+$", value) else (value, "", "")
    turned = "".join(
        chr((ord(c) - 48 + 1) % 10 + 48)
        if c.isdigit()
        else "abcdefa"["abcdef".index(c) + 1]
        if c in "abcdef"
        else chr((ord(c) - 103 + 1) % 20 + 103)
        if "g" <= c <= "z"
        else c
        for c in stem[-6:]
    )
    return stem[:-6] + turned + dot + ext


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, list[str], list[str], bool]]:
    """(method, path template, path parameters, query parameters, takes a body) of the live
    spec's operations, then of the UI router's routes that take a path parameter."""
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            params = op.get("parameters", [])
            yield (
                method.upper(),
                path,
                [p["name"] for p in params if p["in"] == "path"],
                [p["name"] for p in params if p["in"] == "query"],
                "requestBody" in op,
            )
    for route in ui_routes(ui.router):
        path = getattr(route, "path", "")
        names = re.findall(r"{(\w+)(?::\w+)?}", path)
        template = re.sub(r"{(\w+):\w+}", r"{\1}", path)
        for method in sorted(getattr(route, "methods", set()) - {"HEAD"}):
            if names:
                yield method, template, names, [], (method, template) in BODIES


def ui_routes(router: APIRouter) -> Iterator[BaseRoute]:
    """The routes of the UI's router and the routers it includes."""
    for route in router.routes:
        included = getattr(route, "original_router", None)  # FastAPI's included router
        yield from ui_routes(included) if isinstance(included, APIRouter) else (route,)


def shown(reply: httpx.Response, value: str) -> str:
    """What the reply says, with the value sent in the parameter made a placeholder."""
    where = reply.headers.get("location", "")
    return f"{reply.status_code} {where} {reply.text}".replace(value, "<sent>")


def unmapped(spec: dict[str, Any]) -> list[str]:
    """The parameters and bodies the tables below do not say what to send in."""
    gaps = []
    for method, template, path_params, query_params, has_body in operations(spec):
        gaps += [
            f"{method} {template}: path {p}"
            for p in path_params
            if (template, p) not in PATH_OBJECTS
        ]
        gaps += [f"{method} {template}: query {q}" for q in query_params if q not in QUERY_OBJECTS]
        called = path_params or any(QUERY_OBJECTS.get(q) for q in query_params)
        if has_body and called and (method, template) not in BODIES:
            gaps.append(f"{method} {template}: a body in BODIES")
    return gaps


class Call(NamedTuple):
    """One operation with red's object in one parameter (`<sent>` marks where)."""

    method: str
    template: str
    param: str
    choice: str
    theirs: str
    path: str
    query: dict[str, str]
    others: tuple[str, ...]  # red's values in the other path parameters

    def send(self, client: httpx.Client, value: str, **body: Any) -> httpx.Response:
        return client.request(
            self.method,
            self.path.replace("<sent>", value),
            params={k: v.replace("<sent>", value) for k, v in self.query.items()},
            **body,
        )


def calls(spec: dict[str, Any], objects: dict[str, str]) -> Iterator[Call]:
    """Each parameter naming an object, with each object it may name; every other path
    parameter holds red's first object for it."""
    for method, template, path_params, query_params, _ in operations(spec):
        firsts = {p: objects[PATH_OBJECTS[(template, p)][0]] for p in path_params}
        for param in path_params:
            path, others = template, tuple(v for p, v in firsts.items() if p != param)
            for other, value in firsts.items():
                path = path.replace("{" + other + "}", "<sent>" if other == param else value)
            for choice in PATH_OBJECTS[(template, param)]:
                yield Call(method, template, param, choice, objects[choice], path, {}, others)
        path = template
        for other, value in firsts.items():
            path = path.replace("{" + other + "}", value)
        for param in query_params:
            named = QUERY_OBJECTS[param]
            if named is not None:
                query, others = {param: "<sent>"}, tuple(firsts.values())
                yield Call(method, template, param, named, objects[named], path, query, others)


def judged(
    call: Call, mine: httpx.Response, nothing: httpx.Response, secrets: set[str]
) -> list[str]:
    """What is wrong with blue's reply for red's object (`mine`), against its reply for one
    that does not exist (`nothing`)."""
    said = f"{call.method} {call.template} with red's {call.choice} in {call.param}"
    none = missing(call.theirs)
    wrong = []
    if nothing.status_code in (400, 422) or "security token" in nothing.text:
        # refused before any object was looked up: the sweep checked nothing there
        wrong.append(f"{said}: what was sent is refused, fix BODIES: {nothing.text[:300]}")
    if (call.method, call.template) in CREATES:
        if not (mine.status_code == 409 and nothing.is_success):
            wrong.append(f"{said}: {mine.status_code} {mine.text[:300]}")
    elif call.choice in SHARED:
        pass  # every team reads it: only red's part of it must not show
    elif shown(mine, call.theirs) != shown(nothing, none):
        wrong.append(
            f"{said}: {shown(mine, call.theirs)[:300]!r}, where for one that does not exist: "
            f"{shown(nothing, none)[:300]!r}"
        )
    elif mine.is_success and not call.query:  # a filter may answer an empty list
        wrong.append(f"{said}: answered {mine.status_code} {mine.text[:300]}")
    text = mine.text
    for value in (call.theirs, *call.others):  # echoes of what blue sent
        text = text.replace(value, "")
    held = [s for s in secrets if s in text]
    if held:
        wrong.append(f"{said}: the reply holds red's {held}: {mine.text[:300]}")
    return wrong


def test_no_route_tells_another_team_of_its_objects(store: Appliance) -> None:
    admin = store.client()
    red = store.client(team_key(admin, "red"))
    blue = store.client(team_key(admin, "blue"))
    objects = red_objects(store, admin, red)
    secrets = {v for k, v in objects.items() if k != "team"} | {'"red-1"', "'red'", '"red"'}
    ui_blue = signed_in(store, team_key(admin, "blue-ui"))
    ui_blue.headers["x-csrf-token"] = csrf_of(ui_blue.get("/ui/keys").text)
    spec = blue.get("/openapi.json").json()
    gaps = unmapped(spec)
    assert not gaps, "say which object each of these names (or what to send):\n" + "\n".join(gaps)

    leaks: list[str] = []
    tried = 0
    for call in calls(spec, objects):
        client = ui_blue if call.template.startswith("/ui/") else blue
        body = BODIES.get((call.method, call.template), {})
        mine = call.send(client, call.theirs, **body)
        nothing = call.send(client, missing(call.theirs), **body)
        leaks += judged(call, mine, nothing, secrets)
        if (call.method, call.template) in CREATES and nothing.is_success:  # blue's own file
            assert admin.delete(f"/v1/storage/model-files/{missing(call.theirs)}").is_success
        tried += 1
    assert not leaks, "routes that tell blue of red's objects:\n" + "\n".join(leaks)
    assert tried > 40, tried

    # the objects were there all along: red still reads its own
    for path in (
        f"/v1/model-endpoints/{objects['endpoint']}",
        f"/v1/async-tasks/{objects['task']}",
        f"/v1/files/{objects['file']}",
        f"/v1/batches/{objects['batch']}",
        f"/v2/batch-completions/{objects['batch completions']}",
        f"/v1/api-keys/{objects['key']}",
        "/v1/storage/hf-downloads/acme/red-1b",
        "/v1/llm/model-endpoints/red-local/files/red-tune.gguf",
    ):
        assert red.get(path).status_code == 200, path

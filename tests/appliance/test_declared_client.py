"""What `appliance export` and `apply` say when the api refuses: the operator reads a line per
problem, naming its place in the file, not the api's JSON."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from appliance import declared

PROBLEMS = [
    {"type": "missing", "loc": ["body", "keys", 0, "user"], "msg": "Field required", "input": {}},
    {
        "type": "int_parsing",
        "loc": ["body", "endpoints", 1, "max_workers"],
        "msg": "Bad",
        "input": 1,
    },
]


def refusing(detail: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.dumps({"detail": detail}).encode()
            self.send_response(422)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def api() -> Iterator[tuple[HTTPServer, str]]:
    server = HTTPServer(("127.0.0.1", 0), refusing(None))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_refusal_listing_problems_names_each_place_in_the_file(
    api: tuple[HTTPServer, str],
) -> None:
    server, base = api
    server.RequestHandlerClass = refusing(PROBLEMS)
    with pytest.raises(declared.ClientError) as refused:
        declared.call(base, "k", "POST", "/v1/config/apply", {})
    assert str(refused.value) == (
        "the api answered 422: keys[0].user: Field required; endpoints[1].max_workers: Bad"
    )
    server.RequestHandlerClass = refusing("endpoints[1].max_workers: Input should be >= 0")
    with pytest.raises(declared.ClientError) as refused:
        declared.call(base, "k", "POST", "/v1/config/apply", {})
    assert str(refused.value) == (
        "the api answered 422: endpoints[1].max_workers: Input should be >= 0"
    )

"""What `appliance export` and `apply` say when the api refuses: the operator reads a line per
problem, naming its place in the file, not the api's JSON."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance import cli, declared
from appliance.settings import Settings

PROBLEMS = [
    {"type": "missing", "loc": ["body", "keys", 0, "user"], "msg": "Field required", "input": {}},
    {
        "type": "int_parsing",
        "loc": ["body", "endpoints", 1, "max_workers"],
        "msg": "Bad",
        "input": 1,
    },
]


def answering(method: str, status: int, reply: Any) -> type[BaseHTTPRequestHandler]:
    """An api answering every request of `method` with `status` and `reply` as JSON."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            body = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    setattr(Handler, f"do_{method}", Handler.answer)
    return Handler


def refusing(detail: Any) -> type[BaseHTTPRequestHandler]:
    return answering("POST", 422, {"detail": detail})


def exporting() -> type[BaseHTTPRequestHandler]:
    """An api whose `GET /v1/config` holds nothing."""
    return answering("GET", 200, {"version": 1, "endpoints": [], "keys": []})


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


def test_a_key_file_that_cannot_be_read_or_is_empty_is_refused_not_replaced(
    tmp_path: Path,
) -> None:
    """A missing or empty --key-file is an error in words, never a traceback, and never the
    admin key kept in the data directory in its place (which would act for every team)."""
    settings = Settings(data_dir=tmp_path)
    (tmp_path / "admin-key").write_text("mea_000000000001_adminadminadminadmin\n")
    with pytest.raises(declared.ClientError, match="cannot read the key file"):
        declared.access(settings, None, None, tmp_path / "missing")
    empty = tmp_path / "team.key"
    empty.write_text("\n")
    with pytest.raises(declared.ClientError, match="is empty"):
        declared.access(settings, None, None, empty)
    empty.write_text("mea_000000000002_teamteamteamteamteam\n")
    _, key = declared.access(settings, None, None, empty)
    assert key == "mea_000000000002_teamteamteamteamteam"


def test_export_to_a_file_it_cannot_write_says_so(
    api: tuple[HTTPServer, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, base = api
    server.RequestHandlerClass = exporting()
    key = tmp_path / "k"
    key.write_text("k")
    out = tmp_path / "no-such-dir" / "config.yaml"
    argv = ["export", "--url", base, "--key-file", str(key), "-o", str(out)]
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    assert str(ended.value).startswith(f"appliance export: cannot write {out}")


@pytest.mark.parametrize("url", ["notaurl", "box:8000", "ftp://box", "http://[::1", "http://"])
def test_a_url_that_is_no_api_address_is_refused_in_one_line(url: str, tmp_path: Path) -> None:
    """`--url box:8000` (no scheme) or a malformed address printed urllib's traceback; it is
    a line naming the option and the shape it takes."""
    with pytest.raises(SystemExit) as ended:
        cli.main(["export", "--url", url, "--key", "k", "-o", str(tmp_path / "c.yaml")])
    assert str(ended.value) == (
        f"appliance export: --url {url}: not the api's address; give it as http://HOST:PORT "
        "(or https://)"
    )


def test_a_file_that_is_not_text_is_refused_in_words(tmp_path: Path) -> None:
    """`appliance apply -f` on a file that is not UTF-8 text (a binary picked by mistake, a
    UTF-16 export) printed Python's UnicodeDecodeError traceback; a key file the same."""
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\xff\xfeendpoints: []\n")
    with pytest.raises(declared.ClientError, match=r"cannot read .*config.yaml: .*utf-8"):
        declared.read_document(binary)
    with pytest.raises(declared.ClientError, match="cannot read the key file"):
        declared.access(Settings(data_dir=tmp_path), None, None, binary)

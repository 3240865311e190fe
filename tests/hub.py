"""A Hugging Face hub on loopback, for the weights tests: it serves model directories as hub
repositories over the HTTP contract `huggingface_hub` downloads through (what `HF_ENDPOINT`
points at), so the appliance's real download code runs against it.

What it answers, as huggingface.co does:
- `GET /api/models/{repo}[/revision/{rev}]` (`?blobs=true`: sizes, blob ids, LFS hashes) and
  `GET /api/models/{repo}/tree/{rev}?recursive=true`;
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with `X-Repo-Commit` and an `ETag` (a small file,
  served at once), or a 302 to a "CDN" (the same server under `localhost`, another origin, so
  the client drops its token as it does for the real CDN) with `X-Linked-Etag` (the sha256)
  and `X-Linked-Size` for an LFS file; the CDN honours `Range` (206);
- errors with `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `GatedRepo`, `EntryNotFound`)
  and `X-Error-Message`, as `huggingface_hub` sorts them.

Switches, set on the object while it runs: `rate_bytes_s` (each CDN body throttled), `cut_after`
(the next `cuts` CDN bodies are cut off at that byte of the file), `answer` (401: every request
refused as a wrong token; 404: every repository unknown), `gated` (repositories that need a
token in `granted_tokens`). `log` lists each request (method, path, Range, status, bytes).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 64 * 1024
LFS_FROM_BYTES = 1024 * 1024  # larger files are LFS files, served from the CDN
_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}  # file -> (git blob id, sha256)


@dataclass(frozen=True)
class HubFile:
    path: str
    local: Path
    size: int
    blob_id: str
    sha256: str

    @property
    def lfs(self) -> bool:
        return self.size >= LFS_FROM_BYTES

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    sent: int


def _digests(path: Path) -> tuple[str, str]:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        blob, sha = hashlib.sha1(f"blob {stat.st_size}\0".encode()), hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                blob.update(chunk)
                sha.update(chunk)
        _DIGESTS[key] = (blob.hexdigest(), sha.hexdigest())
    return _DIGESTS[key]


@dataclass
class Repo:
    """A directory served as a repository at one commit (`main` points at it)."""

    files: dict[str, HubFile]
    commit: str

    @classmethod
    def of(cls, directory: Path) -> Repo:
        files = {}
        for local in sorted(p for p in directory.rglob("*") if p.is_file()):
            name = local.relative_to(directory).as_posix()
            if name.startswith("."):
                continue
            blob, sha = _digests(local)
            files[name] = HubFile(name, local, local.stat().st_size, blob, sha)
        commit = hashlib.sha1(json.dumps([(f.path, f.etag) for f in files.values()]).encode())
        return cls(files, commit.hexdigest())

    def siblings(self, blobs: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for f in self.files.values():
            entry: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                entry.update(size=f.size, blobId=f.blob_id)
                if f.lfs:
                    entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            out.append(entry)
        return out

    def tree(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for f in self.files.values():
            entry: dict[str, Any] = {"type": "file", "path": f.path, "size": f.size}
            entry["oid"] = f.blob_id
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        return out


@dataclass
class Hub:
    repos: dict[str, Repo]
    rate_bytes_s: float | None = None
    cut_after: int | None = None
    cuts: int = 0
    answer: int | None = None
    gated: set[str] = field(default_factory=set)
    granted_tokens: set[str] = field(default_factory=set)
    log: list[Logged] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @classmethod
    def serving(cls, repos: dict[str, Path]) -> Hub:
        return cls({name: Repo.of(path) for name, path in repos.items()}).start()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Hub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def gets(self, suffix: str) -> list[Logged]:
        """The GETs that sent the body of a file whose path ends with `suffix` (say
        `/config.json`), through the CDN or straight from `resolve`."""
        names = {f.sha256: p for r in self.repos.values() for p, f in r.files.items()}
        found = []
        for entry in list(self.log):
            if entry.method != "GET" or entry.status not in (200, 206):
                continue
            path = entry.path.split("?")[0]
            target = "/" + names.get(path.rsplit("/", 1)[-1], "") if "/_cdn/" in path else path
            if target.endswith(suffix) and "/api/" not in path:
                found.append(entry)
        return found


RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<what>revision|tree)/(?P<rev>[^/]+))?$")


class _Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        self._status, self._sent = 0, 0
        try:
            self._answer(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            entry = Logged(
                self.command, self.path, self.headers.get("Range"), self._status, self._sent
            )
            self.hub.log.append(entry)

    def _answer(self, body: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        if path.startswith("/_cdn/"):
            return self._cdn(path.removeprefix("/_cdn/"), body)
        if self.hub.answer == 401:
            return self._error(401, None, "Invalid credentials in Authorization header")
        api, resolve = API.match(path), RESOLVE.match(path)
        match = api or resolve
        if match is None:
            return self._error(404, None, "Not found")
        repo = None if self.hub.answer == 404 else self.hub.repos.get(match["repo"])
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not self._allowed(match["repo"]):
            return
        revision = unquote(match["rev"] or "main")
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if api is not None:
            return self._api(match["repo"], repo, api["what"], parse_qs(parts.query))
        return self._resolve(repo, resolve["file"] if resolve else "", body)

    def _allowed(self, name: str) -> bool:
        if name not in self.hub.gated:
            return True
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if not token:
            self._error(401, "GatedRepo", "Access to model is restricted. You must have access")
        elif token not in self.hub.granted_tokens:
            self._error(
                403, "GatedRepo", "Access to model is restricted and you are not in the list"
            )
        return token in self.hub.granted_tokens

    def _api(self, name: str, repo: Repo, what: str | None, query: dict[str, list[str]]) -> None:
        if what == "tree":
            return self._json(repo.tree(), repo)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        info = {"id": name, "modelId": name, "sha": repo.commit, "private": False}
        self._json({**info, "siblings": repo.siblings(blobs)}, repo)

    def _json(self, value: Any, repo: Repo) -> None:
        data = json.dumps(value).encode()
        self._head(
            200, {"Content-Type": "application/json", "X-Repo-Commit": repo.commit}, len(data)
        )
        self._write(data)

    def _resolve(self, repo: Repo, name: str, body: bool) -> None:
        hub_file = repo.files.get(name)
        if hub_file is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist", repo.commit)
        common = {"X-Repo-Commit": repo.commit}
        if hub_file.lfs:
            cdn = f"http://localhost:{self.hub.port}/_cdn/{hub_file.sha256}"
            headers = {**common, "Location": cdn, "X-Linked-Etag": f'"{hub_file.sha256}"'}
            headers["X-Linked-Size"] = str(hub_file.size)
            return self._head(302, headers, 0)
        data = hub_file.local.read_bytes()
        self._head(200, {**common, "ETag": f'"{hub_file.blob_id}"'}, len(data))
        if body:
            self._write(data)

    def _cdn(self, sha256: str, body: bool) -> None:
        found = [f for r in self.hub.repos.values() for f in r.files.values() if f.sha256 == sha256]
        if not found:
            return self._error(404, None, "no such object")
        hub_file = found[0]
        start = 0
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if asked:
            start = int(asked[1])
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        length = hub_file.size - start
        if asked:
            headers["Content-Range"] = f"bytes {start}-{hub_file.size - 1}/{hub_file.size}"
        self._head(206 if asked else 200, headers, length)
        if body:
            self._stream(hub_file.local, start)

    def _stream(self, local: Path, start: int) -> None:
        cut = None
        if self.hub.cut_after is not None and self.hub.cuts > 0:
            self.hub.cuts -= 1
            cut = self.hub.cut_after
        with local.open("rb") as file:
            file.seek(start)
            while chunk := file.read(CHUNK):
                if cut is not None and start + self._sent + len(chunk) > cut:
                    self._write(chunk[: max(cut - start - self._sent, 0)])
                    self.close_connection = True
                    return
                self._write(chunk)
                if self.hub.rate_bytes_s:
                    time.sleep(len(chunk) / self.hub.rate_bytes_s)

    def _error(self, status: int, code: str | None, message: str, commit: str = "") -> None:
        data = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._head(status, headers, len(data))
        self._write(data)

    def _head(self, status: int, headers: dict[str, str], length: int) -> None:
        self._status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _write(self, data: bytes) -> None:
        if self.command == "HEAD":
            return
        self.wfile.write(data)
        self._sent += len(data)

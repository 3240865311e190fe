"""`appliance export` and `appliance apply -f FILE`: the configuration as YAML, kept in git.

Both talk to the running api over HTTP with a key (`GET /v1/config`, `POST /v1/config/apply`)
rather than to the database: validation, tenancy, the audit log and the builder's nudges then
happen exactly as for a change made through the API or the UI, the CLI needs no database
access (it works from a laptop), and a team's key exports and applies only its team's
endpoints. Run on the box itself it needs no key option: it reads the admin key the api kept
in the data directory.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from appliance.settings import Settings

TIMEOUT_S = 120
HEADER = (
    "# Model Engine Appliance configuration (`appliance export`).\n"
    "# Apply with `appliance apply -f FILE`; add --prune to delete what it does not name.\n"
    "# Keys carry names, teams, scopes and limits only: new keys get new secrets.\n"
)


class ClientError(Exception):
    """The api refused or could not be reached; the message says why."""


def access(settings: Settings, url: str | None, key: str | None, key_file: Path | None) -> Any:
    """(base URL, key): the options, else this box's api and the admin key it keeps."""
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    base = (url or f"http://{host}:{settings.port}").rstrip("/")
    try:
        parts = urllib.parse.urlsplit(base)
        known = (
            parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
        )
    except ValueError:  # a bracket left open, a port that is no number
        known = False
    if not known:
        raise ClientError(
            f"--url {url}: not the api's address; give it as http://HOST:PORT (or https://)"
        )
    if key_file is not None:  # never the admin key instead of a file that holds none
        try:
            key = key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientError(f"cannot read the key file {key_file}: {exc}") from None
        if not key:
            raise ClientError(f"the key file {key_file} is empty")
    key = key or settings.admin_key
    if not key:
        kept = settings.data_dir / "admin-key"
        if not kept.is_file():
            raise ClientError("no key: pass --key-file FILE (or --key KEY)")
        key = kept.read_text().strip()
    return base, key


def call(base: str, key: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body, default=str).encode()  # YAML dates
    request = urllib.request.Request(  # noqa: S310 - the operator's own URL
        base + path,
        data=data,
        method=method,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:  # noqa: S310
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except ValueError:
            detail = exc.reason
        raise ClientError(f"the api answered {exc.code}: {_said(detail)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ClientError(f"cannot reach the api at {base}: {exc}") from None


def _said(detail: Any) -> Any:
    """A refusal's detail in words: a list of validation problems (FastAPI's 422) as one
    `place: message` each, the place as in the file (`keys[0].user`)."""
    if not isinstance(detail, list):
        return detail
    said = []
    for problem in detail:
        if not isinstance(problem, dict):
            said.append(str(problem))
            continue
        loc = list(problem.get("loc") or ())
        place = ""
        for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
            place += f"[{part}]" if isinstance(part, int) else f".{part}" if place else str(part)
        message = problem.get("msg", "")
        said.append(f"{place}: {message}" if place else str(message))
    return "; ".join(said)


def llm_engine_yaml(endpoints: list[dict[str, Any]], skipped: list[dict[str, str]]) -> str:
    """One YAML document per endpoint: LLM Engine's create request, with what does not carry
    over as comments above it; the endpoints LLM Engine cannot express, as comments first."""
    head = "".join(
        f"# skipped {item['name']} (team {item['team']}): {item['reason']}\n" for item in skipped
    )
    documents = []
    for item in endpoints:
        notes = "".join(f"# {note}\n" for note in item["notes"])
        documents.append(notes + yaml.safe_dump(item["request"], sort_keys=False))
    return head + ("---\n".join(documents) if documents else "# no endpoints to export\n")


def export(base: str, key: str, form: str) -> str:
    if form == "llm-engine":
        answer = call(base, key, "GET", "/v1/config?format=llm-engine")
        return llm_engine_yaml(answer["endpoints"], answer.get("skipped", []))
    document = yaml.safe_dump(call(base, key, "GET", "/v1/config"), sort_keys=False)
    return HEADER + document


def read_document(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ClientError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict):
        raise ClientError(f"{path} holds no configuration (a mapping with endpoints, keys)")
    return document


# what a dry run says for each verb of the api's report: nothing has happened yet
WOULD = {
    "created": "would create",
    "updated": "would update",
    "deleted": "would delete",
    "revoked": "would revoke",
}


def apply(base: str, key: str, path: Path, *, prune: bool, dry_run: bool) -> str:
    """Apply the file; returns what changed, in words (new keys' texts included: once)."""
    query = urllib.parse.urlencode({"prune": str(prune).lower(), "dry_run": str(dry_run).lower()})
    report = call(base, key, "POST", f"/v1/config/apply?{query}", read_document(path))
    lines = ["dry run: nothing changed" if dry_run else "applied"]
    for kind, groups in (("endpoint", report["endpoints"]), ("key", report["keys"])):
        for verb, names in groups.items():
            said = WOULD.get(verb, verb) if dry_run else verb
            for name in names:
                label = name["label"] if isinstance(name, dict) else name
                why = report["changes"].get(label) if verb == "updated" else None
                lines.append(f"{said} {kind} {label}" + (f": {why}" if why else ""))
                if isinstance(name, dict) and name.get("key"):
                    lines.append(f"  key (shown once): {name['key']}")
    return "\n".join(lines) + "\n"

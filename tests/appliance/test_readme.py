"""The README documents every setting with its default, exactly as the code defines them."""

from __future__ import annotations

from pathlib import Path

from appliance.settings import Settings, settings_table

README = Path(__file__).parents[2] / "README.md"


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

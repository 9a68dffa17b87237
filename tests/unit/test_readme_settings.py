"""The README's configuration table lists every setting, and only settings that exist."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _table_variables() -> list[str]:
    start = README.index("| variable | default | meaning |")
    table = README[start : README.index("\n\n", start)]
    first_cells = [row.split("|")[1] for row in table.splitlines()[2:]]
    return [name for cell in first_cells for name in re.findall(r"`SLIMSERVE_([A-Z0-9_]+)`", cell)]


def test_readme_configuration_table_matches_the_settings() -> None:
    documented = _table_variables()
    assert len(documented) == len(set(documented)), "a setting is listed twice"
    fields = {name.upper() for name in Settings.model_fields}
    assert sorted(fields - set(documented)) == [], "settings missing from the README table"
    assert sorted(set(documented) - fields) == [], "README table rows that are not settings"
    assert Settings.model_config.get("env_prefix") == "SLIMSERVE_"

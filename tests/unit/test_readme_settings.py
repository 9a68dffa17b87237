"""The README's configuration table lists every setting, and only settings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

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


def test_the_grpc_port_is_its_own_or_off() -> None:
    """README: SLIMSERVE_GRPC_PORT 0 turns gRPC off; a port that an HTTP listener already has is refused."""
    assert Settings(grpc_port=0).grpc_port == 0
    for taken in ({"port": 9000}, {"management_port": 9000}, {"metrics_port": 9000}):
        with pytest.raises(ValidationError, match="give gRPC its own"):
            Settings(grpc_port=9000, **taken)

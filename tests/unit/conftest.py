"""Fixtures shared by the in-process unit tests. Each module defines its own ``settings`` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from model_store import ModelStore
from service.settings import Settings


@pytest.fixture
def store(settings: Settings) -> Iterator[ModelStore]:
    """A real store (SQLite + blob folder) opened from the module's settings, closed after the test."""
    s = settings.open_store()
    yield s
    s.close()

"""The test suite's own scheduling: the slow files conftest runs first are real files."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import SLOW_FILES_FIRST

ROOT = Path(__file__).resolve().parents[1]


def test_slow_files_first_names_existing_test_files() -> None:
    missing = [name for name in SLOW_FILES_FIRST if not (ROOT / name).is_file()]
    assert not missing, f"conftest.SLOW_FILES_FIRST names files that are gone: {missing}"

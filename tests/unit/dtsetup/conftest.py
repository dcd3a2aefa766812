from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dtsetup_support import CODE, FULL_KEYS, ini_text

DATA = Path(__file__).parent / "data"


@pytest.fixture
def seed_ini() -> Path:
    """The seed's sample DTSetup.ini [L566-634], byte for byte (incl. its NBSP lines)."""
    return DATA / "seed_DTSetup.ini"


@pytest.fixture
def code() -> str:
    return CODE


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[..., Path]:
    def write(text: str, name: str = "DTSetup.ini") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def full_ini(write_file: Callable[..., Path]) -> Callable[..., Path]:
    """A complete valid [Config] section, with keys overridden (None = leave the key out)."""

    def make(section: str = "Config", **override: str | None) -> Path:
        keys = dict(FULL_KEYS)
        for key, value in override.items():
            if value is None:
                keys.pop(key, None)
            else:
                keys[key] = value
        return write_file(ini_text(section, keys))

    return make

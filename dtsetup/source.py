"""The untyped form of a DTSetup document, shared by the INI and the YAML readers.

Both readers produce a :class:`RawDocument`: sections in file order, each mapping an
upper-cased key to the raw string value and the line it came from, so that every later
finding (typing, schema) can name file, line, section and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dtsetup.reports import Report

__all__ = ["RawDocument", "RawEntry", "RawSection", "load_document"]


@dataclass(frozen=True, slots=True)
class RawEntry:
    key: str  # upper-cased: keys are case-insensitive [INFERRED from seed L566 vs L642]
    written_key: str  # as written in the file, for messages
    value: str | None  # None = blank (KEY= or YAML null)
    line: int | None


@dataclass(slots=True)
class RawSection:
    name: str  # case-sensitive, as written [seed L562]
    line: int | None
    entries: dict[str, RawEntry] = field(default_factory=dict)


@dataclass(slots=True)
class RawDocument:
    file: str
    sections: dict[str, RawSection] = field(default_factory=dict)


def load_document(path: Path, *, text: str | None = None) -> tuple[RawDocument, list[Report]]:
    """Read ``path`` as YAML when it ends in .yaml/.yml, else as DTSetup.ini."""
    if path.suffix.lower() in (".yaml", ".yml"):
        from dtsetup import yamlsrc

        return yamlsrc.load(path, text=text)
    from dtsetup import ini  # without PyYAML: an INI file does not need it

    return ini.load(path, text=text)

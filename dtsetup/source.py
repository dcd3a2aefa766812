"""The untyped form of a DTSetup document, shared by the INI and the YAML readers.

Both readers produce a :class:`RawDocument`: sections in file order, each mapping an
upper-cased key to the raw string value and the line it came from, so that every later
finding (typing, schema) can name file, line, section and key. Both read their file the
same way (:func:`decode`, :func:`read_with`).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dtsetup.reports import Code, Report, error

__all__ = ["RawDocument", "RawEntry", "RawSection", "decode", "load_document", "read_with"]


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


Parser = Callable[[str, str], tuple[RawDocument, list[Report]]]


def decode(data: bytes) -> str:
    """Decode a DTSetup file as Windows tools write it: UTF-16 with BOM, UTF-8 (BOM or not),
    else cp1252 (the ANSI code page of the Windows that made the file)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # A cut-off or corrupt file must give a located report, not a traceback.
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def read_with(
    parse: Parser, path: Path, *, text: str | None = None
) -> tuple[RawDocument, list[Report]]:
    """``parse`` the text of ``path`` (read and decoded unless ``text`` is given); an
    unreadable file is one FILE_UNREADABLE report and an empty document."""
    if text is None:
        try:
            text = decode(path.read_bytes())
        except OSError as exc:
            return RawDocument(file=str(path)), [
                error(Code.FILE_UNREADABLE, f"cannot read: {exc.strerror}", file=str(path))
            ]
    return parse(text, str(path))


def load_document(path: Path, *, text: str | None = None) -> tuple[RawDocument, list[Report]]:
    """Read ``path`` as YAML when it ends in .yaml/.yml, else as DTSetup.ini."""
    if path.suffix.lower() in (".yaml", ".yml"):
        from dtsetup import yamlsrc

        return yamlsrc.load(path, text=text)
    from dtsetup import ini  # without PyYAML: an INI file does not need it

    return ini.load(path, text=text)

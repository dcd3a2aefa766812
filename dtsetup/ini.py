"""DTSetup.ini reader that keeps line numbers and reports every problem at once.

Format [seed L558-634]: ``[Config]`` and ``[MachineName]`` sections (names case-sensitive),
``KEY=value`` lines (keys case-insensitive), values optionally in double quotes, blank
lines between entries. The seed states no comment syntax; ``;`` and ``#`` lines are
accepted as comments (reference §3.1 [DESIGN]). Files made on Windows may carry a BOM,
CRLF line ends or be UTF-16; all are read.
"""

from __future__ import annotations

from pathlib import Path

from dtsetup.reports import Code, Report, error
from dtsetup.source import RawDocument, RawEntry, RawSection, decode, read_with

__all__ = ["decode", "load", "parse"]  # decode: the shared reader's (dtsetup.source)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def parse(text: str, file: str) -> tuple[RawDocument, list[Report]]:
    doc = RawDocument(file=file)
    reports: list[Report] = []
    current: RawSection | None = None
    duplicate_section = False  # entries of a duplicate section are checked, then dropped
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        # The seed's sample separates sections with a line holding one (non-breaking)
        # space [L586]: any whitespace-only line is blank.
        line = raw_line.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                reports.append(
                    error(
                        Code.INI_SYNTAX,
                        "section header lacks a closing ']'",
                        file=file,
                        line=lineno,
                    )
                )
                current, duplicate_section = None, True
                continue
            name = line[1:-1].strip()
            if not name:
                reports.append(
                    error(Code.EMPTY_SECTION_NAME, "empty section name", file=file, line=lineno)
                )
                current, duplicate_section = None, True
                continue
            if name in doc.sections:
                first = doc.sections[name].line
                reports.append(
                    error(
                        Code.DUPLICATE_SECTION,
                        f"section [{name}] appears again (first at line {first})",
                        file=file,
                        line=lineno,
                        section=name,
                    )
                )
                current, duplicate_section = RawSection(name=name, line=lineno), True
                continue
            current, duplicate_section = RawSection(name=name, line=lineno), False
            doc.sections[name] = current
            continue
        written_key, equals, value = line.partition("=")
        written_key = written_key.strip()
        if not equals or not written_key:  # not a KEY=value entry
            reports.append(
                error(
                    Code.INI_SYNTAX,
                    "missing key name before '='"
                    if equals
                    else "expected KEY=value, a [Section] header, a comment or a blank line",
                    file=file,
                    line=lineno,
                    section=current.name if current else None,
                )
            )
            continue
        key = written_key.upper()
        if current is None:
            if not duplicate_section:
                reports.append(
                    error(
                        Code.KEY_OUTSIDE_SECTION,
                        "key before the first [Section] header",
                        file=file,
                        line=lineno,
                        key=key,
                    )
                )
            continue
        if key in current.entries:
            first = current.entries[key].line
            reports.append(
                error(
                    Code.DUPLICATE_KEY,
                    f"key {written_key} appears again in [{current.name}] (first at line {first})",
                    file=file,
                    line=lineno,
                    section=current.name,
                    key=key,
                )
            )
            continue
        unquoted = _unquote(value.strip())
        current.entries[key] = RawEntry(
            key=key, written_key=written_key, value=unquoted or None, line=lineno
        )
    if not doc.sections and not any(r.code is Code.DUPLICATE_SECTION for r in reports):
        reports.append(
            error(Code.NO_SECTIONS, "no [Config] or [MachineName] section", file=file, line=None)
        )
    return doc, reports


def load(path: Path, *, text: str | None = None) -> tuple[RawDocument, list[Report]]:
    return read_with(parse, path, text=text)

"""Reports: every problem dtsetup finds is a frozen value with a stable code.

Commands collect reports and return them (or raise :class:`ReportsError` once with all of
them), so an operator sees every problem of a file in one run. Output formats and tests
match on ``code``, never on the message text. The table of codes is in ``docs/dtsetup.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Code",
    "Report",
    "ReportsError",
    "Severity",
    "error",
    "has_errors",
    "warning",
]


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Code(enum.StrEnum):
    """Stable report codes (documented in docs/dtsetup.md)."""

    # input files
    FILE_UNREADABLE = "FILE_UNREADABLE"
    INI_SYNTAX = "INI_SYNTAX"
    KEY_OUTSIDE_SECTION = "KEY_OUTSIDE_SECTION"
    YAML_SYNTAX = "YAML_SYNTAX"
    YAML_SHAPE = "YAML_SHAPE"
    DUPLICATE_SECTION = "DUPLICATE_SECTION"
    DUPLICATE_KEY = "DUPLICATE_KEY"
    EMPTY_SECTION_NAME = "EMPTY_SECTION_NAME"
    NO_SECTIONS = "NO_SECTIONS"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    BAD_VALUE = "BAD_VALUE"
    BLANK_VALUE = "BLANK_VALUE"
    MISSING_KEY = "MISSING_KEY"
    MISSING_ACTIVATION_CODE = "MISSING_ACTIVATION_CODE"
    WINDOWS_PATH = "WINDOWS_PATH"
    NO_SECTION_FOR_HOST = "NO_SECTION_FOR_HOST"
    # command line
    USAGE = "USAGE"
    SILENT_SYNTAX = "SILENT_SYNTAX"
    NOT_ROOT = "NOT_ROOT"
    # convergence
    STEP_FAILED = "STEP_FAILED"
    ROLLBACK_FAILED = "ROLLBACK_FAILED"
    NO_SOFTWARE_SOURCE = "NO_SOFTWARE_SOURCE"
    NO_FIREWALL_BACKEND = "NO_FIREWALL_BACKEND"
    FIREWALL_SKIPPED = "FIREWALL_SKIPPED"
    SERVICE_STARTUP_IGNORED = "SERVICE_STARTUP_IGNORED"
    BAD_AUTH_KEY = "BAD_AUTH_KEY"
    NOT_INSTALLED = "NOT_INSTALLED"
    RECORD_UNREADABLE = "RECORD_UNREADABLE"


@dataclass(frozen=True, slots=True)
class Report:
    """One finding. ``file``/``line``/``section``/``key`` locate it when known."""

    code: Code
    message: str
    severity: Severity = Severity.ERROR
    file: str | None = None
    line: int | None = None
    section: str | None = None
    key: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def location(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        if self.section is not None:
            parts.append(f"[{self.section}]")
        if self.key is not None:
            parts.append(self.key)
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["code"] = str(self.code)
        data["severity"] = str(self.severity)
        return data

    def render(self) -> str:
        loc = self.location()
        return f"{self.severity}: {loc + ': ' if loc else ''}{self.message} [{self.code}]"


def error(code: Code, message: str, **where: Any) -> Report:
    return Report(code=code, message=message, severity=Severity.ERROR, **where)


def warning(code: Code, message: str, **where: Any) -> Report:
    return Report(code=code, message=message, severity=Severity.WARNING, **where)


def has_errors(reports: Iterable[Report]) -> bool:
    return any(r.is_error for r in reports)


class ReportsError(Exception):
    """Raised once with every report a command collected (at least one is an error)."""

    def __init__(self, reports: Iterable[Report]) -> None:
        self.reports: tuple[Report, ...] = tuple(reports)
        super().__init__("; ".join(r.render() for r in self.reports if r.is_error))

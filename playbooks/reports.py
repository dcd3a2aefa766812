"""Findings: what a playbook reports instead of printing or raising (STYLE: reports).

A finding has a stable ``code`` (tests and ``--json`` match on it), a severity, and where
it applies: a spec location (file, JSON path, line) or a host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ERROR", "INFO", "WARNING", "Finding", "has_errors"]

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    severity: str = ERROR
    file: str = ""
    path: str = ""  # JSON path into the spec, e.g. $.resources[1].owners
    line: int | None = None
    host: str = ""

    def render(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "")
        elif self.line:
            where = f"line {self.line}"
        if self.path:
            where = f"{where} {self.path}".strip()
        if self.host:
            where = f"[{self.host}] {where}".strip()
        prefix = f"{where}: " if where else ""
        return f"{self.severity.upper()} {self.code} {prefix}{self.message}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == ERROR for f in findings)

"""Errors with the seed's numeric codes ([L4324-4472]) and structured reports.

Every failure the control API returns is a ``DtakeError``: a stable numeric ``code`` (the
seed's where one exists, ``-1`` otherwise), a message for people, and optional fields.
The CLI renders it as text or ``--json``; scripts match on ``code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DtakeError", "E", "Report"]


class E:
    """Seed error codes used by the service ([L4324-4472])."""

    UNKNOWN = -1
    INVALID_PARAMETER = -101
    INVALID_COMMAND = -102
    CONNECTION_EXISTS = -106
    NO_CONNECTION = -107
    MIRROR_ACTIVE = -108
    SERVER_NOT_FOUND = -109
    SERVER_NOT_RESPONDING = -110
    MIRROR_ALREADY_ACTIVE = -113
    INVALID_OPTION = -116
    MIRROR_NOT_PAUSED = -117
    CONNECTION_NOT_PAUSED = -118
    MIRROR_NOT_RUNNING = -121
    REPSET_EXISTS = -122
    REPSET_MISSING = -123
    NO_REPSET = -124
    REPSET_IN_USE = -130
    NO_TARGET = -131
    INSUFFICIENT_ACCESS = -138
    SOURCE_PATH_INVALID = -140
    CONNECTION_FAILED = -145
    INCOMPATIBLE_VERSIONS = -157
    TARGET_NOT_LOADED = -160
    NOT_SUPPORTED = -161
    TARGET_PAUSED = -162
    INVALID_CONNECTION_ID = -183
    TIMEOUT = -1001  # DESIGN: `dtake wait` timed out (no seed code)
    TARGET_PATH_REFUSED = -1002  # DESIGN: target path not allowed / would loop


@dataclass
class DtakeError(Exception):
    code: int
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.message} (error {self.code})"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


@dataclass(frozen=True)
class Report:
    """One finding: a stable code, a severity and a message (pcs style)."""

    code: str
    message: str
    severity: str = "error"
    where: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

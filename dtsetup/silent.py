"""The seed's silent command line, accepted verbatim [seed L681-687]:

    dtsetup /s /v"DTSETUPINI=\\"/path/DTSetup.ini\\" /qn"

After a POSIX shell has done its quoting the arguments are ``/s`` and
``/vDTSETUPINI="/path/DTSetup.ini" /qn``; without a shell in between (ssh, exec of one
string split on spaces) the inner quotes may still be escaped or the outer ones present,
so both spellings are read. The seed's rules hold: the words are case-sensitive, and "A
space should precede /s, /v, and /qn but should not appear anywhere else".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from dtsetup.reports import Code, Report, error

__all__ = ["is_silent", "parse_silent"]

_V = re.compile(r'^/v"?DTSETUPINI=\\?"(?P<path>[^"\\\s]+)\\?" /qn"?$')
_WHY = (
    'expected exactly: dtsetup /s /v"DTSETUPINI=\\"/path/DTSetup.ini\\" /qn" '
    "(case-sensitive; a space before /s, /v and /qn and nowhere else)"
)


def is_silent(argv: Sequence[str]) -> bool:
    """The silent form is tried when the first word looks like a setup.exe switch."""
    return bool(argv) and argv[0][:2].lower() in ("/s", "/v", "/q")


def parse_silent(argv: Sequence[str]) -> tuple[Path | None, Report | None]:
    if len(argv) != 2 or argv[0] != "/s":
        return None, error(Code.SILENT_SYNTAX, _WHY)
    match = _V.match(argv[1])
    if match is None:
        return None, error(Code.SILENT_SYNTAX, _WHY)
    return Path(match.group("path")), None

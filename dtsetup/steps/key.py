"""The cluster auth key: 32 random bytes as 64 lowercase hex characters and a newline,
mode 0600, generated once (never rotated by a rerun) or provided by the operator.

The file format is the service's (``dtake.protocol.auth.parse_key``): exactly 64 lowercase
hex characters, then at most one newline. A key without the newline is the same key: it
is written back with the newline, never replaced. Anything else (a second newline, CRLF,
a newline inside, spaces, capitals) is not a key. The pattern is anchored with \\A and
\\Z, not ^ and $: $ also matches before a final newline, which let "KEY" + two newlines
through."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

from dtsetup import paths
from dtsetup.reports import Code
from dtsetup.steps.base import Change, Context, ManagedFile, StepError, file_changes, write_files
from dtsetup.txn import Transaction, read_bytes

__all__ = ["AuthKeyStep", "normalize_key", "valid_key"]

_KEY = re.compile(rb"\A[0-9a-f]{64}\n?\Z")


def normalize_key(data: bytes | None) -> bytes | None:
    """The key file content with exactly one final newline, or None if not a key."""
    if data is None or _KEY.match(data) is None:
        return None
    return data if data.endswith(b"\n") else data + b"\n"


def valid_key(data: bytes | None) -> bool:
    """A key file exactly as dtsetup writes it (64 lowercase hex characters, newline)."""
    return data is not None and normalize_key(data) == data


class AuthKeyStep:
    name = "authkey"

    def __init__(self, *, provided: Path | None = None) -> None:
        self.provided = provided
        self._content: bytes | None = None

    def _file(self, ctx: Context) -> ManagedFile:
        if self._content is None:
            if self.provided is not None:
                data = normalize_key(read_bytes(self.provided))
                if data is None:
                    raise StepError(
                        Code.BAD_AUTH_KEY,
                        f"{self.provided}: expected 64 lowercase hex characters and at most "
                        "one newline",
                    )
                self._content = data
            else:
                live = normalize_key(read_bytes(ctx.host(paths.AUTH_KEY)))
                # Keep a valid key: every node of a cluster must hold the same one.
                self._content = live or (secrets.token_hex(32) + "\n").encode()
        assert self._content is not None
        return ManagedFile(paths.AUTH_KEY, self._content, 0o600, secret=True)

    def plan(self, ctx: Context) -> Change:
        return file_changes(ctx, [self._file(ctx)])

    def apply(self, ctx: Context, txn: Transaction) -> None:
        write_files(ctx, txn, [self._file(ctx)])

    def installed(self, ctx: Context) -> dict[str, Any]:
        return {"files": [paths.AUTH_KEY]}

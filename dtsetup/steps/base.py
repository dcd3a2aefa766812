"""Shared step machinery: the run context, plan results and managed files."""

from __future__ import annotations

import difflib
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dtsetup import paths
from dtsetup.model import Settings
from dtsetup.runner import Runner
from dtsetup.txn import Transaction, read_bytes

__all__ = [
    "Change",
    "Context",
    "ManagedFile",
    "Step",
    "StepError",
    "file_changes",
    "redacted_diff",
    "write_files",
]

REDACTED = "<redacted>"


class StepError(Exception):
    """A step cannot plan or apply; ``code`` is a :class:`dtsetup.reports.Code` value."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass
class Context:
    root: Path
    settings: Settings
    runner: Runner
    previous: dict[str, Any] | None  # the record of the last apply, if any
    init: str = "none"  # systemd | systemd-offline | supervisor | none
    firewall: str | None = None  # firewalld | ufw | nftables | None (leave alone)
    pending: set[str] = field(default_factory=set)  # steps that (would) change this run

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    def host(self, path: str) -> Path:
        return paths.under(self.root, path)

    def previous_installed(self, key: str) -> Any:
        return ((self.previous or {}).get("installed") or {}).get(key)


@dataclass(frozen=True, slots=True)
class Change:
    changed: bool
    summary: str = ""
    diff: str = ""
    skipped: bool = False


class Step(Protocol):
    name: str

    def plan(self, ctx: Context) -> Change: ...

    def apply(self, ctx: Context, txn: Transaction) -> None: ...

    def installed(self, ctx: Context) -> dict[str, Any]:
        """What this step owns once applied (for the record, uninstall and export)."""
        ...


@dataclass(frozen=True, slots=True)
class ManagedFile:
    path: str  # absolute on the target host
    content: bytes
    mode: int
    secret: bool = False


def redacted_diff(path: str, old: bytes | None, new: bytes | None, *, secret: bool) -> str:
    if secret:
        before = "(absent)" if old is None else REDACTED
        after = "(absent)" if new is None else REDACTED
        return f"--- {path}\n+++ {path}\n-{before}\n+{after}\n"
    a = [] if old is None else old.decode("utf-8", "replace").splitlines(keepends=True)
    b = [] if new is None else new.decode("utf-8", "replace").splitlines(keepends=True)
    lines = difflib.unified_diff(
        a,
        b,
        fromfile=path if old is not None else "/dev/null",
        tofile=path if new is not None else "/dev/null",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.lstat().st_mode)
    except FileNotFoundError:
        return None


def file_changes(ctx: Context, files: list[ManagedFile], remove: Sequence[str] = ()) -> Change:
    """Compare the full rendered content and mode of each file with the live one."""
    summaries: list[str] = []
    diffs: list[str] = []
    for mf in files:
        live = ctx.host(mf.path)
        old = read_bytes(live) if not live.is_symlink() else None
        if old != mf.content:
            summaries.append(f"{'create' if old is None else 'update'} {mf.path}")
            diffs.append(redacted_diff(mf.path, old, mf.content, secret=mf.secret))
        elif _mode(live) != mf.mode:
            summaries.append(f"chmod {mf.mode:04o} {mf.path}")
    for path in remove:
        live = ctx.host(path)
        if live.exists() or live.is_symlink():
            summaries.append(f"remove {path}")
            diffs.append(redacted_diff(path, read_bytes(live), None, secret=False))
    return Change(changed=bool(summaries), summary="; ".join(summaries), diff="".join(diffs))


def write_files(
    ctx: Context,
    txn: Transaction,
    files: list[ManagedFile],
    remove: Sequence[str] = (),
) -> None:
    for mf in files:
        live = ctx.host(mf.path)
        old = read_bytes(live) if not live.is_symlink() else None
        if old != mf.content:
            txn.write_file(live, mf.content, mf.mode)
        elif _mode(live) != mf.mode:
            txn.chmod(live, mf.mode)
    for path in remove:
        txn.remove_file(ctx.host(path))

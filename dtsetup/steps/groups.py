"""Groups dtadmin (may change things) and dtmon (may only read): the seed's "Double-Take
Admin" and "Double-Take Monitors". Created with groupadd (``--prefix`` under --root)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dtsetup import paths
from dtsetup.steps.base import Change, Context
from dtsetup.txn import Transaction, read_bytes

__all__ = ["GroupsStep", "group_names"]

GROUPS = (paths.ADMIN_GROUP, paths.MONITOR_GROUP)


def group_names(ctx: Context) -> set[str]:
    data = read_bytes(ctx.host(paths.ETC_GROUP)) or b""
    return {line.split(b":", 1)[0].decode() for line in data.splitlines() if b":" in line}


def prefix_args(ctx: Context) -> list[str]:
    return [] if ctx.live else ["--prefix", str(ctx.root)]


def _deleter(ctx: Context, group: str) -> Callable[[], None]:
    def delete() -> None:
        ctx.runner.run(["groupdel", *prefix_args(ctx), group], check=True)

    return delete


class GroupsStep:
    name = "groups"

    def __init__(self) -> None:
        self._missing: list[str] | None = None

    def _plan_missing(self, ctx: Context) -> list[str]:
        if self._missing is None:
            existing = group_names(ctx)
            self._missing = [g for g in GROUPS if g not in existing]
        return self._missing

    def plan(self, ctx: Context) -> Change:
        missing = self._plan_missing(ctx)
        return Change(changed=bool(missing), summary="; ".join(f"groupadd {g}" for g in missing))

    def apply(self, ctx: Context, txn: Transaction) -> None:
        for group in self._plan_missing(ctx):
            if group in group_names(ctx):
                continue
            ctx.runner.run(["groupadd", "--system", *prefix_args(ctx), group], check=True)
            txn.on_undo(f"groupdel {group}", _deleter(ctx, group))

    def installed(self, ctx: Context) -> dict[str, Any]:
        created = set(ctx.previous_installed("groups") or ()) | set(self._plan_missing(ctx))
        return {"groups": sorted(created)}

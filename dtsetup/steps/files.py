"""Folders, the service config and the record of what was applied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dtsetup import paths, render
from dtsetup.steps.base import Change, Context, ManagedFile, file_changes, write_files
from dtsetup.txn import Transaction

__all__ = ["ConfigStep", "FoldersStep", "RecordStep", "record_content"]


class FoldersStep:
    """The install folder, the state directory and the disk queue folder."""

    name = "folders"

    def _wanted(self, ctx: Context) -> list[tuple[str, int]]:
        s = ctx.settings
        wanted = [(s.install_folder, 0o755)]
        if s.server:
            wanted += [
                (paths.ETC_DIR, 0o755),
                (paths.STATE_DIR, 0o750),
                (s.disk_queue_folder, 0o750),
            ]
            if ctx.init == "supervisor":  # systemd makes these itself (RuntimeDirectory=)
                wanted += [(paths.RUN_DIR, 0o755), (paths.SUPERVISOR_LOG_DIR, 0o750)]
        return wanted

    def plan(self, ctx: Context) -> Change:
        missing = [path for path, _ in self._wanted(ctx) if not ctx.host(path).is_dir()]
        return Change(changed=bool(missing), summary="; ".join(f"mkdir {p}" for p in missing))

    def apply(self, ctx: Context, txn: Transaction) -> None:
        for path, mode in self._wanted(ctx):
            txn.make_dirs(ctx.host(path), mode)

    def installed(self, ctx: Context) -> dict[str, Any]:
        return {}


class ConfigStep:
    """/etc/dtake/dtake.yaml, the service's config (whole-file convergence)."""

    name = "config"

    def _file(self, ctx: Context) -> ManagedFile:
        text = render.service_config_text(ctx.settings)
        return ManagedFile(paths.SERVICE_CONFIG, text.encode(), 0o644)

    def plan(self, ctx: Context) -> Change:
        return file_changes(ctx, [self._file(ctx)])

    def apply(self, ctx: Context, txn: Transaction) -> None:
        write_files(ctx, txn, [self._file(ctx)])

    def installed(self, ctx: Context) -> dict[str, Any]:
        return {"files": [paths.SERVICE_CONFIG]}


def record_content(ctx: Context, installed: dict[str, Any], created_dirs: list[str]) -> bytes:
    """Deterministic JSON (no timestamps): same inputs, same bytes, so a rerun is a no-op."""
    dirs = set(ctx.previous_installed("dirs") or ()) | set(created_dirs)
    body = {
        "format": 1,
        "section": ctx.settings.section,
        "settings": ctx.settings.to_keys(),
        "installed": installed | {"dirs": sorted(dirs)},
    }
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


class RecordStep:
    """/etc/dtake/dtsetup.json: settings applied + what was installed (mode 0600: it holds
    the activation codes). ``export`` and ``uninstall`` read it."""

    name = "record"

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps

    def _installed(self, ctx: Context) -> dict[str, Any]:
        merged: dict[str, Any] = {"files": [paths.RECORD]}
        for step in self.steps:
            for key, value in step.installed(ctx).items():
                if key == "files":
                    merged["files"] = sorted(set(merged["files"]) | set(value))
                else:
                    merged[key] = value
        return merged

    def _file(self, ctx: Context, created: list[str]) -> ManagedFile:
        content = record_content(ctx, self._installed(ctx), created)
        return ManagedFile(paths.RECORD, content, 0o600, secret=True)

    def plan(self, ctx: Context) -> Change:
        return file_changes(ctx, [self._file(ctx, [])])

    def apply(self, ctx: Context, txn: Transaction) -> None:
        created = ["/" + str(Path(d).relative_to(ctx.root)) for d in txn.created_dirs]
        write_files(ctx, txn, [self._file(ctx, created)])

    def installed(self, ctx: Context) -> dict[str, Any]:
        return {}

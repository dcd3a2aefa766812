"""The OCF resource agents, copied from the repo's ``resource_agents/`` (whatever exists
there) to /usr/lib/ocf/resource.d/dtake/. A Python shebang is pointed at the install's
virtualenv: agents name their interpreter by absolute path (DESIGN §6: the pyenv shim on
PATH costs 60-80 ms per start)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dtsetup import paths
from dtsetup.steps.base import Change, Context, ManagedFile, file_changes, write_files
from dtsetup.txn import Transaction

__all__ = ["AgentsStep", "default_agents_dir"]

_SKIP_DIRS = {"__pycache__", "tests"}


def default_agents_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "resource_agents"


class AgentsStep:
    name = "agents"

    def __init__(self, source: Path | None) -> None:
        self.source = source

    def _files(self, ctx: Context) -> list[ManagedFile]:
        if self.source is None or not self.source.is_dir():
            return []
        python = f"{ctx.settings.install_folder.rstrip('/')}/venv/bin/python"
        files: list[ManagedFile] = []
        for dirpath, dirnames, filenames in os.walk(self.source):
            dirnames[:] = sorted(
                d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
            )
            for name in sorted(filenames):
                src = Path(dirpath) / name
                if name.startswith(".") or name.endswith((".pyc", ".pyo")) or not src.is_file():
                    continue
                content = src.read_bytes()
                first, sep, rest = content.partition(b"\n")
                if first.startswith(b"#!") and b"python" in first:
                    content = f"#!{python}".encode() + sep + rest
                mode = 0o755 if os.access(src, os.X_OK) else 0o644
                rel = src.relative_to(self.source).as_posix()
                files.append(ManagedFile(f"{paths.OCF_DIR}/{rel}", content, mode))
        return files

    def _stale(self, ctx: Context) -> list[str]:
        wanted = {f.path for f in self._files(ctx)}
        return sorted(set(ctx.previous_installed("agents") or ()) - wanted)

    def plan(self, ctx: Context) -> Change:
        return file_changes(ctx, self._files(ctx), self._stale(ctx))

    def apply(self, ctx: Context, txn: Transaction) -> None:
        write_files(ctx, txn, self._files(ctx), self._stale(ctx))

    def installed(self, ctx: Context) -> dict[str, Any]:
        return {"agents": sorted(f.path for f in self._files(ctx))}

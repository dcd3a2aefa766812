"""Transactions: every change apply makes is journaled so a failure can undo all of it.

File changes are snapshotted before they happen (content, mode, or absence; created
directories; trees moved aside), external changes register an undo callable. ``rollback``
undoes in reverse order and collects the problems instead of stopping at the first;
``commit`` runs the deferred clean-ups (deleting trees that were moved aside).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Transaction", "atomic_write", "read_bytes"]


def read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file in the same directory, fsync, chmod, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".dtsetup", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class Transaction:
    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    _commit: list[Callable[[], None]] = field(default_factory=list)
    created_dirs: list[Path] = field(default_factory=list)

    def on_undo(self, description: str, fn: Callable[[], None]) -> None:
        self._undo.append((description, fn))

    def on_commit(self, fn: Callable[[], None]) -> None:
        self._commit.append(fn)

    # -- directories -------------------------------------------------------------------
    def make_dirs(self, path: Path, mode: int = 0o755) -> list[Path]:
        """Create ``path`` and missing parents; returns the ones created (outermost first)."""
        missing: list[Path] = []
        probe = path
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        created: list[Path] = []
        for directory in reversed(missing):
            directory.mkdir()
            os.chmod(directory, mode)
            created.append(directory)
            self.created_dirs.append(directory)
            self.on_undo(f"rmdir {directory}", directory.rmdir)
        return created

    def remove_dir_if_empty(self, path: Path) -> bool:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            path.rmdir()
        except OSError:
            return False

        def recreate() -> None:
            path.mkdir()
            os.chmod(path, mode)

        self.on_undo(f"mkdir {path}", recreate)
        return True

    # -- files -------------------------------------------------------------------------
    def _snapshot(self, path: Path) -> None:
        if path.is_symlink():
            target = os.readlink(path)

            def restore_link() -> None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                os.symlink(target, path)

            self.on_undo(f"restore link {path}", restore_link)
        elif path.exists() and not path.is_file():
            # A socket or FIFO a program left behind: there is no content to restore.
            return
        elif path.exists():
            old = path.read_bytes()
            old_mode = stat.S_IMODE(path.stat().st_mode)
            self.on_undo(f"restore {path}", lambda: atomic_write(path, old, old_mode))
        else:

            def remove_new() -> None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

            self.on_undo(f"remove {path}", remove_new)

    def write_file(self, path: Path, data: bytes, mode: int) -> None:
        self.make_dirs(path.parent)
        self._snapshot(path)
        if path.is_symlink():
            path.unlink()
        atomic_write(path, data, mode)

    def chmod(self, path: Path, mode: int) -> None:
        old_mode = stat.S_IMODE(path.stat().st_mode)
        os.chmod(path, mode)
        self.on_undo(f"chmod {path}", lambda: os.chmod(path, old_mode))

    def symlink(self, path: Path, target: str) -> None:
        self.make_dirs(path.parent)
        self._snapshot(path)
        if path.is_symlink() or path.exists():
            path.unlink()
        os.symlink(target, path)

    def expect_file(self, path: Path) -> None:
        """``path`` may be created by a program apply runs (the supervisor's log): if it
        does not exist now, it is removed on rollback."""
        if not (path.exists() or path.is_symlink()):
            self._snapshot(path)

    def remove_file(self, path: Path) -> None:
        if not (path.exists() or path.is_symlink()):
            return
        self._snapshot(path)
        path.unlink()

    # -- trees -------------------------------------------------------------------------
    def move_aside(self, path: Path) -> Path | None:
        """Rename a tree out of the way; it is deleted on commit, put back on rollback."""
        if not path.exists():
            return None
        aside = path.with_name(f".{path.name}.dtsetup-old-{uuid.uuid4().hex[:8]}")
        path.rename(aside)

        def put_back() -> None:
            if path.exists():
                shutil.rmtree(path)
            aside.rename(path)

        self.on_undo(f"restore tree {path}", put_back)
        self.on_commit(lambda: shutil.rmtree(aside, ignore_errors=True))
        return aside

    def new_tree(self, path: Path) -> None:
        """Declare that ``path`` (a tree about to be created) goes away on rollback."""
        self.on_undo(f"remove tree {path}", lambda: shutil.rmtree(path, ignore_errors=True))

    # -- end ---------------------------------------------------------------------------
    def rollback(self) -> list[str]:
        problems: list[str] = []
        while self._undo:
            description, fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # keep undoing the rest
                problems.append(f"{description}: {exc}")
        self._commit.clear()
        return problems

    def commit(self) -> None:
        for fn in self._commit:
            fn()
        self._commit.clear()
        self._undo.clear()

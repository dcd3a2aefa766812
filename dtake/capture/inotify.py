"""Ordered change capture from raw inotify, with overflow detection.

The replication journal must come from ordered events with overflow detection
(DESIGN §2; reference/anchors-iac-style.md §4): watchfiles coalesces events into
unordered sets, loses rename pairing and drops ``IN_Q_OVERFLOW`` silently, so it is not
used here. Ops must be applied in the order they changed on the source [L4956-4957], so
``InotifyCapture.read`` returns events exactly in kernel order, one ``FsEvent`` per kernel
event, except that:

- a rename's ``IN_MOVED_FROM``/``IN_MOVED_TO`` pair (same cookie) becomes one ``MOVED``
  (a rename is one op, seed-engine.md §8.1 DESIGN); a ``MOVED_FROM`` whose partner
  never comes (moved out of the watched tree) becomes ``DELETED``, a ``MOVED_TO``
  without a partner (moved in) becomes ``CREATED``/``MKDIR``;
- a new directory is watched at once and what it already contains is reported as
  synthetic ``CREATED``/``MKDIR`` events, closing the mkdir-then-write race that
  recursive watchers are known for (watchfiles #245, fswatch PR #354). Duplicates are
  possible; losses are not;
- events a directory reports about itself are dropped for non-root directories (the
  parent reports the same change with the name), so each change appears once.

Nothing is lost silently: a kernel queue overflow, a watch that cannot be added
(``fs.inotify.max_user_watches`` exhausted, permission) and an unmount under a root are
each reported as an ``OVERFLOW`` event, on which the service marks the connection
Mirror Required and remirrors (DESIGN §2).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import inotify_simple

__all__ = ["WATCH_MASK", "EventKind", "FsEvent", "InotifyCapture"]

log = logging.getLogger("dtake.capture")

# inotify.h constants (kept local: they are ABI and the hot loop wants plain ints).
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

#: What every directory watch asks for. No IN_ACCESS/IN_OPEN: they carry no change.
#: IN_DONT_FOLLOW + IN_ONLYDIR: a symlink to a directory is never watched through.
WATCH_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)

_HEADER = struct.Struct("iIII")
_HEADER_SIZE = _HEADER.size
_READ_CHUNK = 1 << 18  # 256 KiB per os.read
_READ_MAX = 1 << 22  # at most 4 MiB per read() call, so a flood cannot starve the caller
_PAIR_WAIT = 0.02  # s to wait for the MOVED_TO of a MOVED_FROM that ended a read
_PAIR_ROUNDS = 8
_LIMIT_LOG_EVERY = 60.0  # s between repeated watch-limit log lines


class EventKind(enum.Enum):
    CREATED = "created"  # file, symlink, fifo... (the consumer lstat()s)
    MKDIR = "mkdir"
    MODIFIED = "modified"
    CLOSED_WRITE = "closed_write"
    ATTRIB = "attrib"
    DELETED = "deleted"
    MOVED = "moved"
    OVERFLOW = "overflow"  # changes may be lost below ``path`` ("" = every root)


@dataclass(frozen=True, slots=True)
class FsEvent:
    """One change. ``path`` is absolute (for MOVED the old path, ``dest`` the new one);
    for OVERFLOW it is the directory whose changes may be lost, or "" for all roots.

    ``synthetic`` marks CREATED/MKDIR found by listing a new directory rather than
    reported by the kernel: the entry may already hold data (its MODIFY/CLOSE_WRITE
    happened before the watch existed), so the consumer sends its current content.
    """

    kind: EventKind
    path: str
    is_dir: bool = False
    dest: str | None = None
    synthetic: bool = False


def _join(parent: str, name: str) -> str:
    return parent + name if parent.endswith("/") else parent + "/" + name


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top if top.endswith("/") else top + "/")


class InotifyCapture:
    """Recursive inotify watcher over one or more root directories.

    ``prune(dirpath) -> True`` keeps a directory (and so its subtree) unwatched: an
    excluded subtree, the service's queue and state directories. Pruned directories are
    still reported by their parent (MKDIR, DELETED, ...); nothing below them is.

    One thread reads (``read``); ``add_root``/``remove_root`` may be called from another
    thread (a lock guards the watch maps).
    """

    def __init__(self, *, prune: Callable[[str], bool] | None = None) -> None:
        self._prune = prune
        self._ino = inotify_simple.INotify(nonblocking=True)
        self._fd: int = self._ino.fileno()
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._lock = threading.RLock()
        self._wd_path: dict[int, str] = {}
        self._path_wd: dict[str, int] = {}
        self._roots: set[str] = set()
        self._root_wds: set[int] = set()
        self._backlog: list[FsEvent] = []  # events produced outside read() (add_root)
        self._limit_logged_at = -_LIMIT_LOG_EVERY
        self._closed = False

    # -- public API ---------------------------------------------------------------------

    @property
    def watch_count(self) -> int:
        return len(self._wd_path)

    @property
    def roots(self) -> frozenset[str]:
        return frozenset(self._roots)

    def fileno(self) -> int:
        return self._fd

    def add_root(self, path: str) -> None:
        """Watch ``path`` and every directory below it (not following symlinks).

        Idempotent. Existing contents are not reported (the mirror walk covers them;
        capture starts before that walk, DESIGN §2). A directory that cannot be watched
        is reported as OVERFLOW by the next ``read``.
        """
        path = os.path.normpath(os.path.abspath(path))
        if not os.path.isdir(path) or os.path.islink(path):
            if not os.path.lexists(path):
                raise FileNotFoundError(errno.ENOENT, "capture root does not exist", path)
            raise NotADirectoryError(errno.ENOTDIR, "capture root is not a directory", path)
        with self._lock:
            if path in self._path_wd and any(_under(path, r) for r in self._roots):
                return  # already watched as part of a root
            for nested in [r for r in self._roots if _under(r, path)]:
                self._roots.discard(nested)
            self._roots.add(path)
            wd = self._watch(path, self._backlog)
            if wd is None:
                raise FileNotFoundError(errno.ENOENT, "capture root vanished", path)
            self._root_wds = {self._path_wd[r] for r in self._roots if r in self._path_wd}
            self._walk(path, self._backlog, synthetic=False)

    def remove_root(self, path: str) -> None:
        """Stop watching ``path`` and everything below it (unless under another root)."""
        path = os.path.normpath(os.path.abspath(path))
        with self._lock:
            if path not in self._roots:
                return
            self._roots.discard(path)
            self._drop_watches(path, keep_other_roots=True)
            self._root_wds = {self._path_wd[r] for r in self._roots if r in self._path_wd}

    def read(self, timeout: float | None = 0.0) -> list[FsEvent]:
        """Return the events available now, in kernel order, waiting up to ``timeout``
        seconds for the first one (None: wait forever, 0: do not wait)."""
        with self._lock:
            out, self._backlog = self._backlog, []
        if out:
            timeout = 0.0
        data = self._read_available()
        if not data and timeout != 0.0:
            ms = None if timeout is None else max(0, int(timeout * 1000))
            if self._poll.poll(ms):
                data = self._read_available()
        if not data:
            return out
        with self._lock:
            pending: dict[int, tuple[int, str, bool, int]] = {}
            self._process(data, out, pending)
            rounds = 0
            # A rename queues FROM and TO together, but a read can end between them:
            # look again before calling an unpaired FROM a move out of the tree.
            while pending and rounds < _PAIR_ROUNDS and self._poll.poll(int(_PAIR_WAIT * 1000)):
                more = self._read_available()
                if not more:
                    break
                self._process(more, out, pending)
                rounds += 1
            for idx, old, is_dir, _wd in pending.values():
                out[idx] = FsEvent(EventKind.DELETED, old, is_dir)
                if is_dir:
                    self._drop_watches(old, keep_other_roots=False)
            out.extend(self._backlog)
            self._backlog = []
        return [e for e in out if e is not _SKIP]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._poll.unregister(self._fd)
            self._ino.close()
            self._wd_path.clear()
            self._path_wd.clear()
            self._roots.clear()

    def __enter__(self) -> InotifyCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- kernel side --------------------------------------------------------------------

    def _add_watch(self, path: str) -> int:
        """The one call into inotify_add_watch (a seam: tests inject ENOSPC here)."""
        return int(self._ino.add_watch(path, WATCH_MASK))

    def _read_available(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while total < _READ_MAX:
            try:
                chunk = os.read(self._fd, _READ_CHUNK)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def _watch(self, path: str, out: list[FsEvent]) -> int | None:
        """Add a watch; return its wd, or None when the directory cannot be watched
        (gone: its removal is reported by its parent; otherwise an OVERFLOW is queued)."""
        try:
            wd = self._add_watch(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None  # replaced by a file, or a symlink (IN_ONLYDIR|IN_DONT_FOLLOW)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                now = time.monotonic()
                if now - self._limit_logged_at >= _LIMIT_LOG_EVERY:
                    self._limit_logged_at = now
                    log.error(
                        "inotify watch limit reached: cannot watch %s (%d watches held). "
                        "Changes below it are not captured; the connection needs a "
                        "remirror. Raise fs.inotify.max_user_watches "
                        "(sysctl -w fs.inotify.max_user_watches=N).",
                        path,
                        len(self._wd_path),
                    )
            else:
                log.error("cannot watch %s: %s; changes below it are not captured", path, exc)
            out.append(FsEvent(EventKind.OVERFLOW, path, True))
            return None
        old = self._wd_path.get(wd)
        if old is not None and old != path:
            self._path_wd.pop(old, None)  # same inode seen under a new name
        self._wd_path[wd] = path
        self._path_wd[path] = wd
        return wd

    def _walk(self, top: str, out: list[FsEvent], *, synthetic: bool) -> None:
        """Watch every directory below ``top`` (already watched), top-down: a directory
        is watched before it is listed, so an entry is either listed or reported."""
        stack = [top]
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                log.error("cannot list %s: %s", d, exc)
                out.append(FsEvent(EventKind.OVERFLOW, d, True))
                continue
            with it:
                subdirs: list[str] = []
                for entry in it:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    if not (synthetic or is_dir):
                        continue  # a file of a directory being watched: nothing to do
                    p = _join(d, entry.name)
                    if synthetic:
                        kind = EventKind.MKDIR if is_dir else EventKind.CREATED
                        out.append(FsEvent(kind, p, is_dir, synthetic=True))
                    if is_dir:
                        subdirs.append(p)
            for p in reversed(subdirs):
                if self._prune is not None and self._prune(p):
                    continue
                if self._watch(p, out) is not None:
                    stack.append(p)

    def _new_dir(self, path: str, out: list[FsEvent]) -> None:
        """A directory appeared (mkdir or moved in): watch it now and report what it
        already holds."""
        if self._prune is not None and self._prune(path):
            return
        if self._watch(path, out) is not None:
            self._walk(path, out, synthetic=True)

    def _drop_watches(self, top: str, *, keep_other_roots: bool) -> None:
        for p in [p for p in self._path_wd if _under(p, top)]:
            if keep_other_roots and any(_under(p, r) for r in self._roots):
                continue
            wd = self._path_wd.pop(p)
            if self._wd_path.get(wd) == p:
                del self._wd_path[wd]
            try:
                self._ino.rm_watch(wd)
            except OSError:
                pass  # already gone (IN_IGNORED on its way)

    def _rename_watches(self, old: str, new: str) -> None:
        """A watched directory was renamed: every watch at or below it now lives under
        ``new``, so later events carry the new path."""
        cut = len(old)
        for p in [p for p in self._path_wd if _under(p, old)]:
            wd = self._path_wd.pop(p)
            q = new + p[cut:]
            self._path_wd[q] = wd
            self._wd_path[wd] = q
        if self._prune is not None and self._prune(new):
            self._drop_watches(new, keep_other_roots=False)

    def _events(self, data: bytes) -> Iterator[tuple[int, int, int, str]]:
        pos, end = 0, len(data)
        unpack = _HEADER.unpack_from
        while pos < end:
            wd, mask, cookie, size = unpack(data, pos)
            pos += _HEADER_SIZE
            name = os.fsdecode(data[pos : pos + size].rstrip(b"\0")) if size else ""
            pos += size
            yield wd, mask, cookie, name

    def _process(
        self, data: bytes, out: list[FsEvent], pending: dict[int, tuple[int, str, bool, int]]
    ) -> None:
        """Turn raw events into FsEvents appended to ``out``, in order.

        ``pending`` maps the cookie of an unpaired MOVED_FROM to (index of its
        placeholder in ``out``, old path, is_dir, wd).
        """
        wd_path = self._wd_path
        append = out.append
        for wd, mask, cookie, name in self._events(data):
            if mask & IN_Q_OVERFLOW:
                # The kernel dropped events: any rename half we hold may have lost its
                # partner; the remirror that follows covers both ends.
                append(FsEvent(EventKind.OVERFLOW, ""))
                continue
            parent = wd_path.get(wd)
            if parent is None:
                continue  # a watch we already dropped (moved out, removed root)
            is_dir = bool(mask & IN_ISDIR)
            if not name:
                self._self_event(wd, mask, parent, out)
                continue
            path = _join(parent, name)
            if mask & IN_CREATE:
                if is_dir:
                    append(FsEvent(EventKind.MKDIR, path, True))
                    self._new_dir(path, out)
                else:
                    append(FsEvent(EventKind.CREATED, path))
            elif mask & IN_MODIFY:
                append(FsEvent(EventKind.MODIFIED, path, is_dir))
            elif mask & IN_CLOSE_WRITE:
                append(FsEvent(EventKind.CLOSED_WRITE, path, is_dir))
            elif mask & IN_ATTRIB:
                append(FsEvent(EventKind.ATTRIB, path, is_dir))
            elif mask & IN_DELETE:
                append(FsEvent(EventKind.DELETED, path, is_dir))
            elif mask & IN_MOVED_FROM:
                pending[cookie] = (len(out), path, is_dir, wd)
                append(_SKIP)  # placeholder: DELETED if the partner never comes
            elif mask & IN_MOVED_TO:
                src = pending.pop(cookie, None)
                if src is None:  # moved in from outside the watched tree
                    if is_dir:
                        append(FsEvent(EventKind.MKDIR, path, True))
                        self._new_dir(path, out)
                    else:
                        append(FsEvent(EventKind.CREATED, path))
                    continue
                idx, old, _, _ = src
                out[idx] = _SKIP
                # Emitted at the MOVED_TO position: events between the halves were
                # resolved with the old names, so they must come before the rename.
                append(FsEvent(EventKind.MOVED, old, is_dir, path))
                if is_dir:
                    self._rename_watches(old, path)
                    if path not in self._path_wd:
                        # Created and renamed before its CREATE was handled: watching
                        # the old name failed, so nothing below it is watched yet.
                        # Watch it now and report what it holds (duplicates, no loss).
                        self._new_dir(path, out)

    def _self_event(self, wd: int, mask: int, path: str, out: list[FsEvent]) -> None:
        """An event a watched directory reports about itself."""
        if mask & IN_IGNORED:
            # The watch is gone (directory deleted, rm_watch, unmount).
            if self._wd_path.get(wd) == path:
                del self._wd_path[wd]
                if self._path_wd.get(path) == wd:
                    del self._path_wd[path]
            return
        if mask & IN_UNMOUNT:
            log.warning("file system under %s was unmounted; rescan needed", path)
            out.append(FsEvent(EventKind.OVERFLOW, path, True))
            return
        if wd not in self._root_wds:
            return  # the parent's watch reports the same change with the name
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            # A root vanished or moved away: nothing below it can be named any more.
            out.append(FsEvent(EventKind.DELETED, path, True))
            self._drop_watches(path, keep_other_roots=False)
            self._roots.discard(path)
            self._root_wds.discard(wd)
        elif mask & IN_ATTRIB:
            out.append(FsEvent(EventKind.ATTRIB, path, True))
        elif mask & IN_MODIFY:
            out.append(FsEvent(EventKind.MODIFIED, path, True))


_SKIP = FsEvent(EventKind.OVERFLOW, "\0skip")  # placeholder, never returned

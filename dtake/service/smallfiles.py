"""A mirror's small files, read a directory's slice at a time (FILES items and ops).

The mirror walk queues the small regular files of a directory by name in one FILES
item (``dtake.service.queue``); the sender turns it into FILES ops (``dtake.ops``): one
read loop relative to the directory's fd, one op for up to ``FILES_OP_FILES`` files,
instead of a queue item, a path lookup and an op per file.

**Reading ahead.** Reading is most of a small file's cost, and it is the walk thread
that does it, right after it queued the item: a queue item may be read at any time
*after* it took its place in the queue (every change after that place has its own item
behind it), so the data read ahead is as new as the sender's own read would have been.
Reading before queueing would not be: a change between the read and the queueing
would have its item *in front* of the stale data. The two threads meet on a small
state machine per item (``Prefetch``): the sender takes what was read, waits while it
is being read, or, when it gets to the item first, reads it itself and the walk skips
it. Doing the system calls of a whole directory in the thread that just listed it,
while the sender encodes and sends, is what keeps the two threads from trading the
interpreter lock at every system call.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FILES_OP_FILES", "FilesRead", "Prefetch", "read_files"]

FILES_OP_FILES = 256  # files in a FILES op (and names in a FILES queue item), at most

_IFMT, _IFREG = 0o170000, stat.S_IFREG
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


@dataclass(slots=True)
class FilesRead:
    """What reading a FILES item found. ``batches``: one FILES op each, as (entries
    ``[name, size, mode, uid, gid, mtime_ns]``, the data back to back, the inodes);
    ``vanished``: names found gone; ``rest``: names that go the per-file way (no longer
    a small regular file with one link, or not readable here); ``dir_gone``: the
    directory itself went or was replaced (every name vanished)."""

    batches: list[tuple[list[list[Any]], bytes, list[int]]] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)
    dir_gone: bool = False


def read_files(d: str, names: list[str], max_size: int, op_bytes: int) -> FilesRead:
    """Read the files ``names`` of directory ``d``: each is checked (``lstat``) to be
    a regular file of at most ``max_size`` bytes with one link and no holes, read, and
    checked again on its descriptor (same size, still regular, one link), so data and
    attributes go together. Batches close at ``FILES_OP_FILES`` files or ``op_bytes``
    bytes. An error reading the directory itself sends every name the per-file way."""
    out = FilesRead()
    try:
        dfd = os.open(d, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in _GONE:
            out.dir_gone = True
            out.vanished = list(names)
        else:
            out.rest = list(names)
        return out
    entries: list[list[Any]] = []
    datas: list[bytes] = []
    inos: list[int] = []
    nbytes = 0
    vanished, rest = out.vanished, out.rest
    stat_at, open_at, pread, fstat, close = os.stat, os.open, os.pread, os.fstat, os.close
    try:
        for name in names:
            try:
                st = stat_at(name, dir_fd=dfd, follow_symlinks=False)
                size = st.st_size
                if (
                    st.st_mode & _IFMT != _IFREG
                    or st.st_nlink > 1
                    or size > max_size
                    or st.st_blocks * 512 < size
                ):
                    rest.append(name)
                    continue
                fd = open_at(name, _FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                vanished.append(name)
                continue
            except OSError:
                rest.append(name)
                continue
            try:
                data = pread(fd, size + 1, 0) if size else b""
                st = fstat(fd)
            except OSError:
                rest.append(name)
                continue
            finally:
                close(fd)
            n = len(data)
            if n != st.st_size or st.st_mode & _IFMT != _IFREG or st.st_nlink > 1:
                rest.append(name)  # changed while read: the per-file way reads it again
                continue
            entries.append([name, n, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns])
            datas.append(data)
            inos.append(st.st_ino)
            nbytes += n
            if nbytes >= op_bytes or len(entries) >= FILES_OP_FILES:
                out.batches.append((entries, b"".join(datas), inos))
                entries, datas, inos, nbytes = [], [], [], 0
        if entries:
            out.batches.append((entries, b"".join(datas), inos))
    finally:
        close(dfd)
    return out


class Prefetch:
    """The read-ahead of one FILES item, shared by the walk (reader) and the sender
    under the connection's ``cond``: IDLE -> READING -> READY, or -> TAKEN when the
    sender gets there first (the walk then leaves it alone)."""

    IDLE, READING, READY, TAKEN = range(4)
    __slots__ = ("result", "state")

    def __init__(self) -> None:
        self.state = Prefetch.IDLE
        self.result: FilesRead | None = None

    def start(self, cond: threading.Condition) -> bool:
        """The walk: may it read this item now?"""
        with cond:
            if self.state != Prefetch.IDLE:
                return False
            self.state = Prefetch.READING
            return True

    def done(self, cond: threading.Condition, result: FilesRead | None) -> None:
        """The walk: this is what it read (None: it failed; the sender reads)."""
        with cond:
            self.result = result
            self.state = Prefetch.READY
            cond.notify_all()

    def take(self, cond: threading.Condition) -> FilesRead | None:
        """The sender: what was read ahead (waiting while it is being read), or None:
        nothing, read it now."""
        with cond:
            while self.state == Prefetch.READING:
                cond.wait()
            result, self.result = self.result, None
            self.state = Prefetch.TAKEN
            return result

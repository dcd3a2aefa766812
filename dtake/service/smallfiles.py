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
would have its item *in front* of the stale data. For the same reason a file that
already had a CONTENT or ATTRS item waiting when the FILES item was queued is queued by
itself instead (``SourceQueue.put_files``): a later change would be merged into that
waiting item, in front of the data read ahead. The two threads meet on a small
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
from collections.abc import Iterator
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

    batches: list[tuple[list[list[Any]], bytearray, list[int]]] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)
    dir_gone: bool = False

    def missed(self, name: str, exc: OSError) -> None:
        """``name`` could not be looked at: gone (vanished), or the per-file way."""
        (self.vanished if isinstance(exc, FileNotFoundError) else self.rest).append(name)


def _plain(st: os.stat_result) -> bool:
    """A regular file with one link and no holes (what a FILES op may carry)."""
    return st.st_mode & _IFMT == _IFREG and st.st_nlink == 1 and st.st_blocks * 512 >= st.st_size


def read_files(
    d: str, names: list[str], max_size: int, op_bytes: int, sizes: list[int] | None = None
) -> FilesRead:
    """Read the files ``names`` of directory ``d``: each is checked (``lstat``) to be
    a regular file of at most ``max_size`` bytes with one link and no holes, then
    opened (``O_NOFOLLOW | O_NONBLOCK``) and checked again on its descriptor before a
    byte is read (still regular, same size, one link, no holes). ``sizes``: what the
    walk's ``lstat`` found a moment ago, for the read-ahead right after queueing: the
    first check is that one, not a second ``lstat``. Batches close at
    ``FILES_OP_FILES`` files or ``op_bytes`` bytes; a batch's files are read straight
    into one buffer (no copy to join them). An error opening the directory itself
    sends every name the per-file way."""
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
    try:
        listed = (
            zip(names, sizes, strict=True)
            if sizes is not None
            else _listed(dfd, names, max_size, out)
        )
        batch: list[tuple[str, int]] = []
        nbytes = 0
        for name, size in listed:
            batch.append((name, size))
            nbytes += size
            if nbytes >= op_bytes or len(batch) >= FILES_OP_FILES:
                _read_batch(dfd, batch, nbytes, out)
                batch, nbytes = [], 0
        if batch:
            _read_batch(dfd, batch, nbytes, out)
    finally:
        os.close(dfd)
    return out


def _listed(dfd: int, names: list[str], max_size: int, out: FilesRead) -> Iterator[tuple[str, int]]:
    """(name, size) of each of ``names`` that ``lstat`` finds a regular file of at most
    ``max_size`` bytes with one link and no holes; the others go to ``out``."""
    stat_at = os.stat
    for name in names:
        try:
            st = stat_at(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            out.missed(name, exc)
            continue
        if not _plain(st) or st.st_size > max_size:
            out.rest.append(name)
            continue
        yield name, st.st_size


def _read_batch(dfd: int, batch: list[tuple[str, int]], nbytes: int, out: FilesRead) -> None:
    """Read ``batch`` (names and their sizes by ``lstat``) into one buffer, back to
    back; a file whose size or kind changed meanwhile goes to ``out.rest``."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    extra = [bytearray(1)]  # a byte beyond the size: the file grew
    entries: list[list[Any]] = []
    inos: list[int] = []
    pos = 0
    open_at, preadv, fstat, close = os.open, os.preadv, os.fstat, os.close
    try:
        for name, size in batch:
            try:
                fd = open_at(name, _FLAGS, dir_fd=dfd)
            except OSError as exc:
                out.missed(name, exc)
                continue
            try:
                # The descriptor's attributes go with the data read next: a change
                # during the read has its own item behind this one (it sends the file
                # again); a change of size is seen here.
                st = fstat(fd)
                if not _plain(st) or st.st_size != size:
                    out.rest.append(name)  # not what was listed any more: per file
                    continue
                n = preadv(fd, [view[pos : pos + size], *extra], 0)
            except OSError:
                out.rest.append(name)
                continue
            finally:
                close(fd)
            if n != size:
                out.rest.append(name)  # changed while read: the per-file way reads it again
                continue  # (its bytes, if any, are overwritten by the next file's)
            entries.append([name, n, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns])
            inos.append(st.st_ino)
            pos += n
    finally:
        view.release()
    if entries:
        out.batches.append((entries, buf if pos == nbytes else buf[:pos], inos))


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

"""Target side: apply replication ops confined beneath the connection's target root.

Confinement (DESIGN §2, not negotiable): an op names a relative POSIX path; absolute
paths, ``..``, ``.``, empty components and NUL are refused. Every parent component is
opened with ``O_DIRECTORY|O_NOFOLLOW`` relative to its parent's fd, starting from a root
fd opened once, and the last component is only touched with *at calls on the parent fd
that never follow a symlink. A symlink in a parent component is a ConfinementError. So a
peer cannot write, delete, rename, chmod or create anything outside the root, whatever
links exist below it. Because everything goes through the root fd opened at start, a
read-only bind mount laid over the root later ("block target paths" [L5001-5011]) blocks
other programs but not us.

Write semantics [§8.3]: FILE_BEGIN..WRITE..FILE_END writes ``.<name>.dtake-<token>`` in
the same directory and renames it over the final name, so no reader ever sees a half
written file; WRITE without a transfer writes in place (block/real-time updates). WRITEs
cover data extents only, FILE_END/SETSIZE set the length, so holes stay holes. mtime is
set last so it equals the source's to the nanosecond.

Re-applying is safe for each op on its own (mkdir of an existing dir, delete of a missing
path, rename whose source is gone, a FILE_BEGIN that restarts a transfer). It is NOT safe
to replay a sequence across later namespace changes (WRITE a, RENAME a->b replayed would
recreate a partial ``a``): the receiver must skip ops at or below its last applied
sequence number, as the seed's target does with its queue position.

Not thread-safe for concurrent writers: one applier thread per TargetTree (a lock guards
``apply``/``cleanup_temp``/``close``); ``scan``/``block_hashes``/``file_digest`` only read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import random
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from dtake.ops import Op, OpKind

__all__ = [
    "TEMP_MARK",
    "ConfinementError",
    "Entry",
    "TargetTree",
    "block_hashes_fd",
    "file_digest_fd",
    "is_temp_name",
    "split_rel",
    "temp_name",
]

TEMP_MARK = ".dtake-"
_TEMP_RE = re.compile(r"\..*\.dtake-[0-9a-f]{16}", re.DOTALL)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO someone left in the tree must not hang the applier.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_IO_CHUNK = 1024 * 1024
MAX_BLOCK_SIZE = 64 * 1024 * 1024
# Parent directories kept open between ops (a burst of small files in one directory
# resolves its path once). Emptied on every namespace change (rename, delete, a
# directory replaced), after a failed op, and when the receiver goes idle.
DIR_CACHE_MAX = 256
# Two writers for a run of whole small files only while a file costs this much or more
# to write (a moving average): see TargetTree.apply_whole_files.
TWO_WRITERS_FROM_S = 50e-6
PREALLOCATE_MIN = 1024 * 1024  # FILE_BEGIN sizes from this on are preallocated
# Whole-file transfers of at least this size (FILE_BEGIN carries it) are written with
# O_DIRECT where the writes are aligned: no copy into the page cache (see _write).
DIRECT_MIN = 4 * 1024 * 1024
DIRECT_ALIGN = 4096  # offsets, lengths and the buffer address of direct writes
DIRECT_WRITE_MIN = 64 * 1024  # smaller writes go through the page cache
DIRECT_BUF = 1024 * 1024  # the aligned bounce buffer (direct writes go in pieces of it)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for all threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777  # unknown: every new file gets an explicit chmod


class _NeedsReplace(Exception):
    """A whole-file rename would remove a directory: redone by the applier itself."""


class ConfinementError(PermissionError):
    """An op tried to reach outside the target root (or through a symlink)."""

    code = "PATH_ESCAPE"

    def __init__(self, path: object, why: str) -> None:
        super().__init__(errno.EPERM, f"refusing target path {path!r}: {why}")
        self.path = path
        self.why = why


@dataclass(frozen=True, slots=True)
class Entry:
    """One scanned name below the root (kind "f" file, "d" directory, "l" symlink)."""

    path: str
    kind: str
    size: int
    mtime_ns: int
    mode: int  # permission bits only (stat.S_IMODE); the type is ``kind``
    uid: int
    gid: int
    link: str | None = None
    nlink: int = 1


@dataclass(slots=True)
class _Transfer:
    fd: int  # the open temp file
    dir_fd: int  # its directory (the rename happens there)
    tmp: str
    name: str
    size: int = 0  # the temp file's current length (it starts empty; WRITEs extend it)
    direct: bool = False  # the fd has O_DIRECT set (big whole-file transfer, see _write)


def split_rel(path: object, *, allow_root: bool = False) -> tuple[str, ...]:
    """Validate an op path and split it into components; raises ConfinementError."""
    if not isinstance(path, str):
        raise ConfinementError(path, "not a string")
    if "\0" in path:
        raise ConfinementError(path, "contains NUL")
    if path == "":
        if allow_root:
            return ()
        raise ConfinementError(path, "empty path")
    if path.startswith("/"):
        raise ConfinementError(path, "absolute path")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise ConfinementError(path, f"component {part!r} is not allowed")
    return parts


def is_temp_name(name: str) -> bool:
    """True for this service's own temp files (skipped by scans, removed after a crash)."""
    return _TEMP_RE.fullmatch(name) is not None


def temp_name(name: str) -> str:
    # Keep the temp name within NAME_MAX (255 bytes) for long final names.
    if len(name) > 50 and len(os.fsencode(name)) > 200:  # <= 4 bytes per character
        name = os.fsdecode(os.fsencode(name)[:100]).rstrip("\udcff")
    # Uniqueness, not secrecy: the name is created with O_EXCL, and a getrandom(2) call
    # per file (secrets) was measurable on the many-small-files path.
    return f".{name}{TEMP_MARK}{random.getrandbits(64):016x}"


def _read_full(fd: int, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


def block_hashes_fd(fd: int, block_size: int) -> list[int]:
    """xxh3_64 of each ``block_size`` block (the last may be short), read from offset 0.

    The source side must hash with exactly this function (``xxhash.xxh3_64_intdigest`` per
    block) for checksum mirrors and verification to agree.
    """
    if not 0 < block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block size {block_size} out of range")
    os.lseek(fd, 0, os.SEEK_SET)
    buf = memoryview(bytearray(block_size))
    out: list[int] = []
    while n := _read_full(fd, buf):
        out.append(xxhash.xxh3_64_intdigest(buf[:n]))
        if n < block_size:
            break
    return out


def file_digest_fd(fd: int) -> bytes:
    """Whole-file xxh3_128 digest (16 bytes), read from offset 0."""
    os.lseek(fd, 0, os.SEEK_SET)
    h = xxhash.xxh3_128()
    buf = memoryview(bytearray(_IO_CHUNK))
    while n := _read_full(fd, buf):
        h.update(buf[:n])
    return h.digest()


def _split_point(dirs: list[int]) -> int:
    """Where to cut a run of whole-file jobs (their directory fds, in order) into two
    halves for two threads: the directory change nearest the middle if one lies in the
    middle half, else the middle."""
    n = len(dirs)
    mid = n // 2
    for off in range(n // 4 + 1):
        for i in (mid - off, mid + off):
            if 0 < i < n and dirs[i] != dirs[i - 1]:
                return i
    return mid


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _set_direct(fd: int, on: bool) -> bool:
    """Set or clear O_DIRECT on ``fd``; False where the file system refuses it."""
    try:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (fl | os.O_DIRECT) if on else (fl & ~os.O_DIRECT))
    except OSError:
        return False
    return True


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


_libc: ctypes.CDLL | None = None


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return _libc


def _preallocate(fd: int, size: int) -> bool:
    """fallocate(2) ``size`` bytes (the file's length becomes ``size``); False where the
    file system cannot (never glibc's emulation, which would write zeros)."""
    return bool(_libc_handle().fallocate(fd, 0, 0, size) == 0)


def _syncfs(fd: int) -> None:
    if _libc_handle().syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class TargetTree:
    """The target root of one connection; applies ops beneath it and nowhere else."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        # Opened once: later bind mounts over ``root`` do not affect what we write through.
        self.root = root
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._transfers: dict[str, _Transfer] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._is_root = os.geteuid() == 0
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._umask = _umask()
        # parent parts -> (borrowed dir fd, whether the directory is set-group-ID)
        self._dirs: dict[tuple[str, ...], tuple[int, bool]] = {}
        self._root_sgid = bool(os.fstat(self._root_fd).st_mode & stat.S_ISGID)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._file_s = 0.0  # moving average: wall time to write one whole small file
        self._clock = time.perf_counter  # (a seam for the unit tests)
        self._dio_buf: mmap.mmap | None = None  # aligned buffer of direct writes
        self._handlers: dict[OpKind, Callable[[Op], None]] = {
            OpKind.MKDIR: self._mkdir,
            OpKind.FILE_BEGIN: self._file_begin,
            OpKind.WRITE: self._write,
            OpKind.FILE_END: self._file_end,
            OpKind.TRUNCATE: self._setsize,
            OpKind.SETSIZE: self._setsize,
            OpKind.RENAME: self._rename,
            OpKind.DELETE: self._delete,
            OpKind.ATTRS: self._attrs,
            OpKind.SYMLINK: self._symlink,
            OpKind.BARRIER: lambda op: None,
        }

    # -- public ----------------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        """Apply one op; raises ConfinementError, OSError or ValueError on failure."""
        with self._lock:
            if self._closed:
                raise ValueError("target tree is closed")
            handler = self._handlers.get(op.kind)
            if handler is None:
                raise ValueError(f"unknown op kind {op.kind!r}")
            try:
                handler(op)
            except BaseException:
                self._drop_dirs()  # whatever failed, resolve paths afresh
                raise

    def release_dirs(self) -> None:
        """Close the cached parent directories (the receiver is idle)."""
        with self._lock:
            self._drop_dirs()

    def transfers_in_progress(self) -> list[str]:
        with self._lock:
            return sorted(self._transfers)

    def scan(self, rel: str = "") -> Iterator[Entry]:
        """Every file, directory and symlink below ``rel`` (pre-order, names sorted).

        Never follows symlinks, skips our temp files and other file types (FIFOs,
        sockets, devices are not replicated). A missing or non-directory ``rel`` yields
        nothing.
        """
        opened = self._open_scan_root(rel)
        if opened is not None:
            yield from self._scan_fd(*opened)

    def _open_scan_root(self, rel: str) -> tuple[int, str] | None:
        """(owned fd, path prefix) of the directory a scan starts at; None: nothing."""
        parts = split_rel(rel, allow_root=True)
        try:
            fd = self._open_dir(parts, create=False)
        except NotADirectoryError:
            return None
        if fd is None:
            return None
        return fd, "/".join(parts) + "/" if parts else ""

    def scan_rows(
        self, rel: str = "", chunk: int = 2000, *, short: bool = False
    ) -> Iterator[list[list[Any]]]:
        """What ``scan`` finds, as compact rows ``[path, kind, size, mtime_ns, mode, uid,
        gid, link]`` in lists of about ``chunk`` rows. The mirror's fast path: one tight
        loop per directory, no Entry objects, no nested generators; the order is by
        directory (each directory's rows before those of its subdirectories), not
        ``scan``'s pre-order. ``short``: rows of the first four fields only (what a
        differences mirror compares; no readlink)."""
        opened = self._open_scan_root(rel)
        if opened is None:
            return
        S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
        out: list[list[Any]] = []
        stack = [opened]
        try:
            while stack:
                fd, prefix = stack.pop()
                try:
                    subdirs: list[tuple[str, str]] = []
                    with os.scandir(fd) as it:
                        for e in it:
                            name = e.name
                            if TEMP_MARK in name and is_temp_name(name):
                                continue
                            try:
                                st = e.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue
                            mode = st.st_mode
                            fmt = mode & S_IFMT
                            link = None
                            if fmt == S_IFREG:
                                kind = "f"
                            elif fmt == S_IFDIR:
                                kind = "d"
                                subdirs.append((name, prefix + name + "/"))
                            elif fmt == S_IFLNK:
                                kind = "l"
                                if not short:
                                    link = os.readlink(name, dir_fd=fd)
                            else:
                                continue
                            path = prefix + name
                            size, mtime = st.st_size, st.st_mtime_ns
                            if short:
                                out.append([path, kind, size, mtime])
                                continue
                            out.append(
                                [path, kind, size, mtime, mode & 0o7777, st.st_uid, st.st_gid, link]
                            )
                    for name, sub in reversed(subdirs):
                        try:
                            stack.append((os.open(name, _DIR_FLAGS, dir_fd=fd), sub))
                        except OSError:
                            continue  # replaced by a non-directory meanwhile
                finally:
                    os.close(fd)
                if len(out) >= chunk:
                    yield out
                    out = []
            if out:
                yield out
        finally:
            for fd, _ in stack:
                os.close(fd)

    def block_hashes(self, rel: str, block_size: int) -> list[int]:
        """Per-block xxh3_64 of a regular file; FileNotFoundError if there is none."""
        fd = self._open_regular_read(rel)
        try:
            return block_hashes_fd(fd, block_size)
        finally:
            os.close(fd)

    def file_digest(self, rel: str) -> bytes:
        """Whole-file xxh3_128 digest of a regular file; FileNotFoundError if there is none."""
        fd = self._open_regular_read(rel)
        try:
            return file_digest_fd(fd)
        finally:
            os.close(fd)

    def cleanup_temp(self) -> int:
        """Remove temp files left by transfers interrupted by a crash; returns how many."""
        with self._lock:
            live = {t.tmp for t in self._transfers.values()}
            return self._cleanup_fd(self._reopen_root(), live)

    def sync(self) -> None:
        """Flush the target filesystem (syncfs); call before persisting an applied position."""
        _syncfs(self._root_fd)

    def close(self) -> None:
        """Abort unfinished transfers (their temp files go) and release the root fd."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for key in list(self._transfers):
                self._abort(key)
            self._drop_dirs()
            os.close(self._root_fd)
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            if self._dio_buf is not None:
                self._dio_buf.close()

    def __enter__(self) -> TargetTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- confined resolution -----------------------------------------------------------------

    def _child_dir(self, dir_fd: int, name: str, *, create: bool, rel: str) -> int | None:
        for _ in range(2):
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(name, 0o755, dir_fd=dir_fd)
                except FileExistsError:
                    pass  # raced with something: reopen (still O_NOFOLLOW)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = _lstat(name, dir_fd)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise ConfinementError(rel, f"parent component {name!r} is a symlink") from None
                raise NotADirectoryError(
                    errno.ENOTDIR, f"{rel}: parent component {name!r} is not a directory"
                ) from None
        raise OSError(errno.EAGAIN, f"{rel}: could not open parent component {name!r}")

    def _reopen_root(self) -> int:
        """A new open file description of the root (not os.dup: a dup shares the
        directory offset, and on btrfs a second listing through it then stopped where
        the first one ended)."""
        return os.open(".", _DIR_FLAGS, dir_fd=self._root_fd)

    def _open_dir(self, parts: tuple[str, ...], *, create: bool) -> int | None:
        """An owned fd of the directory ``parts`` (walked component by component)."""
        if not parts:
            return self._reopen_root()
        rel = "/".join(parts)
        # The first component is opened relative to the root fd itself (no dup/close pair
        # per op: measurable with many small files); every fd we open is ours to close.
        fd = self._child_dir(self._root_fd, parts[0], create=create, rel=rel)
        if fd is None:
            return None
        try:
            for name in parts[1:]:
                child = self._child_dir(fd, name, create=create, rel=rel)
                os.close(fd)
                fd = -1
                if child is None:
                    return None
                fd = child
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return fd

    def _dir_entry(self, parts: tuple[str, ...], *, create: bool) -> tuple[int, bool] | None:
        """(borrowed fd, set-group-ID) of the parent of ``parts``, from the cache.

        Only for the applier (under ``_lock``): the fd stays owned by the cache."""
        dparts = parts[:-1]
        if not dparts:
            return self._root_fd, self._root_sgid
        hit = self._dirs.get(dparts)
        if hit is not None:
            return hit
        fd = self._open_dir(dparts, create=create)
        if fd is None:
            return None
        if len(self._dirs) >= DIR_CACHE_MAX:
            self._drop_dirs()
        try:
            sgid = bool(os.fstat(fd).st_mode & stat.S_ISGID)
        except BaseException:
            os.close(fd)
            raise
        self._dirs[dparts] = (fd, sgid)
        return fd, sgid

    @contextlib.contextmanager
    def _parent(self, parts: tuple[str, ...], *, create: bool) -> Iterator[int | None]:
        """An owned fd of the parent directory of ``parts`` for the block (None: missing);
        for callers outside the applier (the applier uses the cache: ``_pdir``)."""
        fd = self._open_dir(parts[:-1], create=create)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _pdir(self, parts: tuple[str, ...], *, create: bool) -> int | None:
        """Borrowed fd of the parent directory of ``parts`` (None: it does not exist)."""
        hit = self._dir_entry(parts, create=create)
        return None if hit is None else hit[0]

    def _drop_dirs(self) -> None:
        dirs, self._dirs = self._dirs, {}
        for fd, _ in dirs.values():
            os.close(fd)

    def _open_regular_read(self, rel: str) -> int:
        parts = split_rel(rel)
        d = self._open_dir(parts[:-1], create=False)  # owned: readers run in any thread
        if d is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", rel)
        try:
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=d)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOENT):
                    raise FileNotFoundError(errno.ENOENT, "no regular file", rel) from None
                raise
        finally:
            os.close(d)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "not a regular file", rel)
        return fd

    # -- transfers ---------------------------------------------------------------------------

    def _abort(self, key: str) -> None:
        t = self._transfers.pop(key)
        os.close(t.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(t.tmp, dir_fd=t.dir_fd)
        os.close(t.dir_fd)

    def _abort_under(self, key: str) -> None:
        # A namespace change at or above an unfinished transfer invalidates it; a later
        # WRITE/FILE_END for that path falls back to in-place semantics and converges.
        prefix = key + "/"
        for k in [k for k in self._transfers if k == key or k.startswith(prefix)]:
            self._abort(k)

    # -- attributes --------------------------------------------------------------------------

    def _chown_ok(self, exc: OSError) -> bool:
        # Without root, owners cannot be preserved (as rsync): keep the data, skip the owner.
        return not self._is_root and exc.errno == errno.EPERM

    def _attrs_fd(self, fd: int, op: Op) -> None:
        # One fstat up front: chown/chmod that would change nothing are skipped (most
        # files arrive with the receiver's own owner), and neither changes the atime.
        st = os.fstat(fd)
        chowned = False
        if (op.uid is not None and op.uid != st.st_uid) or (
            op.gid is not None and op.gid != st.st_gid
        ):
            try:
                os.fchown(fd, -1 if op.uid is None else op.uid, -1 if op.gid is None else op.gid)
                chowned = True
            except PermissionError as exc:
                if not self._chown_ok(exc):
                    raise
        if op.mode is not None and (chowned or stat.S_IMODE(st.st_mode) != op.mode & 0o7777):
            os.fchmod(fd, op.mode & 0o7777)  # after chown: chown clears set-id bits
        if op.mtime_ns is not None:
            os.utime(fd, ns=(st.st_atime_ns, op.mtime_ns))  # last: nothing may touch it after

    def _attrs_at(self, dir_fd: int, name: str, op: Op) -> None:
        st = _lstat(name, dir_fd)
        if st is None:
            return
        if op.uid is not None or op.gid is not None:
            try:
                os.chown(
                    name,
                    -1 if op.uid is None else op.uid,
                    -1 if op.gid is None else op.gid,
                    dir_fd=dir_fd,
                    follow_symlinks=False,
                )
            except PermissionError as exc:
                if not self._chown_ok(exc):
                    raise
        if op.mode is not None and not stat.S_ISLNK(st.st_mode):
            # fchmodat(AT_SYMLINK_NOFOLLOW) never follows; symlink modes are not settable
            # on Linux, so links are skipped above.
            os.chmod(name, op.mode & 0o7777, dir_fd=dir_fd, follow_symlinks=False)
        if op.mtime_ns is not None:
            os.utime(name, ns=(st.st_atime_ns, op.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    # -- helpers for the last component ------------------------------------------------------

    def _remove(self, dir_fd: int, name: str, st: os.stat_result | None = None) -> None:
        st = st if st is not None else _lstat(name, dir_fd)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            # rmtree with dir_fd walks with fds and never follows symlinks. Cached fds
            # may name directories inside it: forget them all (dir_fd stays open: the
            # caller's, or the root).
            self._forget_dirs(dir_fd)
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def _forget_dirs(self, keep: int) -> None:
        """Drop the cached directory fds except ``keep`` (still in use by the caller)."""
        for key, (fd, _) in list(self._dirs.items()):
            if fd != keep:
                del self._dirs[key]
                os.close(fd)

    def _replace(self, src_fd: int, src: str, dst_fd: int, dst: str) -> None:
        """rename(2), removing a destination of another type (or a non-empty dir) first."""
        try:
            os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            self._remove(dst_fd, dst)
            os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)

    def _open_inplace(self, parts: tuple[str, ...], rel: str) -> int:
        """Open (creating if missing) a regular file for in-place writes, never following."""
        d = self._pdir(parts, create=True)
        assert d is not None
        name = parts[-1]
        st = _lstat(name, d)
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise ConfinementError(rel, "final component is a symlink")
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", rel)
            if not stat.S_ISREG(st.st_mode):
                os.unlink(name, dir_fd=d)  # a FIFO/socket/device in the way
                st = None
            elif st.st_nlink > 1:
                # Writing through a hard link would change the other names too (maybe
                # outside the root): give this name its own copy first.
                self._break_hardlink(d, name)
        if st is None:
            return os.open(name, _CREATE_FLAGS, 0o600, dir_fd=d)
        fd = os.open(name, _WRITE_FLAGS, dir_fd=d)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", rel)
        return fd

    def _break_hardlink(self, dir_fd: int, name: str) -> None:
        tmp = temp_name(name)
        src = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(src)
            dst = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
            try:
                pos = 0
                while pos < st.st_size:  # data extents only: holes stay holes
                    try:
                        start = os.lseek(src, pos, os.SEEK_DATA)
                    except OSError as exc:
                        if exc.errno == errno.ENXIO:
                            break
                        raise
                    end = min(os.lseek(src, start, os.SEEK_HOLE), st.st_size)
                    while start < end:
                        data = os.pread(src, min(_IO_CHUNK, end - start), start)
                        if not data:
                            break
                        _pwrite_all(dst, data, start)
                        start += len(data)
                    pos = end
                os.ftruncate(dst, st.st_size)
                copy = Op(OpKind.ATTRS, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
                self._attrs_fd(dst, copy)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        finally:
            os.close(src)

    # -- op handlers -------------------------------------------------------------------------

    def _mkdir(self, op: Op) -> None:
        parts = split_rel(op.path, allow_root=True)
        if not parts:
            self._attrs_fd(self._root_fd, op)  # the root's own attributes
            return
        d = self._pdir(parts, create=True)
        assert d is not None
        name = parts[-1]
        st = _lstat(name, d)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self._abort_under(op.path)
            os.unlink(name, dir_fd=d)
            st = None
        if st is None:
            os.mkdir(name, 0o700 if op.mode is None else op.mode & 0o777, dir_fd=d)
            if op.mode is None:
                os.chmod(name, 0o755, dir_fd=d, follow_symlinks=False)
        self._attrs_at(d, name, op)

    def _file_begin(self, op: Op) -> None:
        parts = split_rel(op.path)
        key = "/".join(parts)
        if key in self._transfers:
            self._abort(key)  # resent after a reconnect: start over
        d = self._open_dir(parts[:-1], create=True)
        assert d is not None
        try:
            tmp = temp_name(parts[-1])
            fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=d)
        except BaseException:
            os.close(d)
            raise
        t = _Transfer(fd=fd, dir_fd=d, tmp=tmp, name=parts[-1])
        # A size on FILE_BEGIN: the source's file has no holes; allocating its blocks up
        # front makes the writes much cheaper (ext4 delayed allocation per page). The
        # temp file then has that length; FILE_END truncates if the file changed size.
        if op.size is not None and op.size >= PREALLOCATE_MIN and _preallocate(fd, op.size):
            t.size = op.size
            t.direct = op.size >= DIRECT_MIN and _set_direct(fd, True)
        self._transfers[key] = t

    def _write(self, op: Op) -> None:
        parts = split_rel(op.path)
        if op.offset < 0:
            raise ValueError(f"negative offset {op.offset}")
        t = self._transfers.get("/".join(parts))
        if t is not None:
            if t.direct:
                self._write_direct(t, op.data, op.offset)
            else:
                _pwrite_all(t.fd, op.data, op.offset)
            if op.data:
                t.size = max(t.size, op.offset + len(op.data))
            return
        fd = self._open_inplace(parts, op.path)
        try:
            _pwrite_all(fd, op.data, op.offset)
        finally:
            os.close(fd)

    def _write_direct(self, t: _Transfer, data: bytes, offset: int) -> None:
        """Write a big transfer's data with O_DIRECT: copied into an aligned buffer and
        written from there to the device, not into the page cache. Filling the page
        cache is most of a buffered write's cost (measured: 1.2-1.7 s of CPU per GiB on
        the benchmark VM, against 0.15-0.2 s direct, copy included; docs/replication-
        performance.md). Unaligned pieces (a file's tail) and any refusal of the file
        system go through the page cache: the fd loses O_DIRECT for good."""
        n = len(data)
        if n < DIRECT_WRITE_MIN or offset % DIRECT_ALIGN or n % DIRECT_ALIGN:
            t.direct = False
            _set_direct(t.fd, False)
            _pwrite_all(t.fd, data, offset)
            return
        if self._dio_buf is None:
            self._dio_buf = mmap.mmap(-1, DIRECT_BUF)  # page-aligned
        buf = self._dio_buf
        src = memoryview(data)
        done = 0
        try:
            while done < n:
                k = min(DIRECT_BUF, n - done)
                buf[:k] = src[done : done + k]
                w = os.pwrite(t.fd, memoryview(buf)[:k], offset + done)
                done += w
                if w != k:  # short (rare): the rest is unaligned now
                    raise OSError(errno.EINVAL, "short direct write")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            t.direct = False
            _set_direct(t.fd, False)
            _pwrite_all(t.fd, src[done:], offset + done)

    def _file_whole(self, op: Op, parts: tuple[str, ...]) -> None:
        """A whole small file in one op (FILE_END tagged ``whole``, its data at offset 0):
        a temp file beside the final name, data, attributes, rename."""
        key = "/".join(parts)
        if key in self._transfers:
            self._abort(key)
        hit = self._dir_entry(parts, create=True)
        assert hit is not None
        self._whole_at(op, hit[0], hit[1], parts[-1], plain=False)

    def _whole_at(self, op: Op, d: int, sgid: bool, name: str, *, plain: bool) -> None:
        """Write ``op``'s file as ``name`` in directory ``d``. No fstat: the new file's
        owner and mode are known, so chown/chmod run only when they would change
        something. ``plain``: only a rename(2) that replaces nothing but a file (no
        directory removal, no cache change: safe in a helper thread); anything else
        raises _NeedsReplace after removing the temp file.

        A name that does not exist yet is created and written in place (O_EXCL: nothing
        is replaced, and nothing but this service writes the target): no temp file and
        no rename, about a third less kernel time per new file on ext4 (a full mirror
        of small files). Should the write fail, the new name is removed again; after a
        crash in the middle, the file's mtime is not the source's yet (set last) and the
        op was not recorded as applied, so it is resent and then replaces the file."""
        mode = 0o600 if op.mode is None else op.mode & 0o7777
        tmp: str | None = None
        try:
            fd = os.open(name, _CREATE_FLAGS, mode & 0o777, dir_fd=d)
        except FileExistsError:
            tmp = temp_name(name)
            fd = os.open(tmp, _CREATE_FLAGS, mode & 0o777, dir_fd=d)
        made = name if tmp is None else tmp
        try:
            try:
                if op.data:
                    _pwrite_all(fd, op.data, 0)
                if op.size is not None and op.size != len(op.data):
                    os.ftruncate(fd, op.size)
                uid = -1 if op.uid is None or op.uid == self._euid else op.uid
                gid = -1 if op.gid is None or (op.gid == self._egid and not sgid) else op.gid
                chowned = False
                if uid != -1 or gid != -1:
                    try:
                        os.fchown(fd, uid, gid)
                        chowned = True
                    except PermissionError as exc:
                        if not self._chown_ok(exc):
                            raise
                if chowned or mode & 0o7000 or mode & self._umask & 0o777:
                    os.fchmod(fd, mode)  # after chown: chown clears set-id bits
                if op.mtime_ns is not None:
                    os.utime(fd, ns=(time.time_ns(), op.mtime_ns))  # last
            finally:
                os.close(fd)
            if tmp is None:
                return  # written in place
            if not plain:
                self._replace(d, tmp, d, name)
                return
            try:
                os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
            except OSError as exc:
                if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise _NeedsReplace() from exc
                raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(made, dir_fd=d)
            raise

    def apply_whole_files(self, ops: list[Op]) -> list[BaseException | None]:
        """Apply whole-file ops (FILE_END tagged ``whole``) for *distinct, independent*
        paths (none is another's parent), two at a time while the file system is slow:
        parents are resolved here, in order; the file system calls of half of the ops
        run in a helper thread (they release the GIL: creating files is kernel time).
        Returns each op's exception or None, in order. An op whose rename would have to remove a directory is redone
        here, after the others (independent paths: the order between them is free)."""
        with self._lock:
            if self._closed:
                raise ValueError("target tree is closed")
            out: list[BaseException | None] = [None] * len(ops)
            jobs: list[tuple[int, Op, int, bool, str]] = []
            for n, op in enumerate(ops):
                try:
                    parts = split_rel(op.path)
                    key = "/".join(parts)
                    if key in self._transfers:
                        self._abort(key)
                    hit = self._dir_entry(parts, create=True)
                    assert hit is not None
                    jobs.append((n, op, hit[0], hit[1], parts[-1]))
                except Exception as exc:
                    out[n] = exc
            redo: list[int] = []

            def run(batch: list[tuple[int, Op, int, bool, str]]) -> None:
                for n, op, d, sgid, name in batch:
                    try:
                        self._whole_at(op, d, sgid, name, plain=True)
                    except _NeedsReplace:
                        redo.append(n)
                    except Exception as exc:
                        out[n] = exc

            # A second writer pays only when the kernel's file creation is slow (ext4
            # without a journal right after mass deletes: 200-500 us a file, which two
            # threads overlap: 4.7-5.1 s instead of 7.0-7.8 s for 20,000 files). When a
            # file takes ~10 us, the hand-offs and the second thread's CPU cost more than
            # they save (one writer 0.70-1.01 s, two 0.80-1.09 s, same mirror, alternating):
            # so two writers only while the average file costs TWO_WRITERS_FROM_S or more.
            two = len(jobs) >= 8 and self._file_s >= TWO_WRITERS_FROM_S
            t0 = self._clock()
            if two:
                # Two contiguous halves, cut at a directory boundary near the middle: a
                # create or rename holds its directory's lock, so two threads working
                # in one directory mostly wait on each other (measured: 20-30 % more
                # kernel time than in different directories).
                cut = _split_point([j[2] for j in jobs])
                helper = self._helper()
                fut = helper.submit(run, jobs[cut:])
                run(jobs[:cut])
                fut.result()
            else:
                run(jobs)
            if jobs:
                # One writer's time per file (two writers: their wall time counted twice,
                # an overestimate that keeps them a little longer once the file system
                # is slow).
                per = (self._clock() - t0) * (2 if two else 1) / len(jobs)
                self._file_s = 0.7 * self._file_s + 0.3 * per
            for n in sorted(redo):
                try:
                    self._file_whole(ops[n], split_rel(ops[n].path))
                except Exception as exc:
                    out[n] = exc
            if any(e is not None for e in out):
                self._drop_dirs()
            return out

    def _helper(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="apply")
        return self._pool

    def _file_end(self, op: Op) -> None:
        parts = split_rel(op.path)
        if op.tags.get("whole"):
            self._file_whole(op, parts)
            return
        t = self._transfers.pop("/".join(parts), None)
        if t is None:
            # No transfer (the receiver restarted mid-file and the WRITEs went in place):
            # finish in place, which converges to the same content and attributes.
            self._setsize(op)
            return
        try:
            try:
                if op.size is not None and op.size != t.size:
                    # Extends with a hole, never zeros. Skipped when the WRITEs already
                    # gave the file its length: ext4 runs its whole truncate path even for
                    # an unchanged size (~10 % of the applier's time with small files).
                    os.ftruncate(t.fd, op.size)
                self._attrs_fd(t.fd, op)
            finally:
                os.close(t.fd)
            # No fsync per file (speed); the receiver syncs before it records a position.
            self._replace(t.dir_fd, t.tmp, t.dir_fd, t.name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t.tmp, dir_fd=t.dir_fd)
            raise
        finally:
            os.close(t.dir_fd)

    def _setsize(self, op: Op) -> None:
        parts = split_rel(op.path)
        size = 0 if op.size is None else op.size
        if size < 0:
            raise ValueError(f"negative size {size}")
        t = self._transfers.get("/".join(parts))
        if t is not None:
            os.ftruncate(t.fd, size)
            t.size = size
            return
        fd = self._open_inplace(parts, op.path)
        try:
            if op.size is not None or op.kind is OpKind.TRUNCATE:
                os.ftruncate(fd, size)
            self._attrs_fd(fd, op)
        finally:
            os.close(fd)

    def _attrs(self, op: Op) -> None:
        parts = split_rel(op.path, allow_root=True)
        if not parts:
            self._attrs_fd(self._root_fd, op)
            return
        d = self._pdir(parts, create=False)
        if d is not None:
            self._attrs_at(d, parts[-1], op)  # a missing path is a no-op (replay)

    def _rename(self, op: Op) -> None:
        src = split_rel(op.path)
        if op.new_path is None:
            raise ValueError("RENAME without new_path")
        dst = split_rel(op.new_path)
        if src == dst:
            return
        if dst[: len(src)] == src or src[: len(dst)] == dst:
            # Into itself, or onto its own ancestor (which would remove the source).
            raise OSError(errno.EINVAL, f"cannot rename {op.path!r} to {op.new_path!r}")
        self._abort_under("/".join(src))
        self._abort_under("/".join(dst))
        self._drop_dirs()  # cached paths may be renamed away
        sd = self._open_dir(src[:-1], create=False)
        if sd is None:
            return
        try:
            if _lstat(src[-1], sd) is None:
                return  # already renamed (replay) or gone: nothing to move
            dd = self._open_dir(dst[:-1], create=True)
            assert dd is not None
            try:
                self._replace(sd, src[-1], dd, dst[-1])
            finally:
                os.close(dd)
        finally:
            os.close(sd)

    def _delete(self, op: Op) -> None:
        parts = split_rel(op.path)
        self._abort_under("/".join(parts))
        d = self._pdir(parts, create=False)
        if d is not None:
            self._remove(d, parts[-1])

    def _symlink(self, op: Op) -> None:
        parts = split_rel(op.path)
        link = op.link
        if not link or "\0" in link:
            raise ValueError(f"SYMLINK {op.path!r} needs a link target without NUL")
        self._abort_under("/".join(parts))
        d = self._pdir(parts, create=True)
        assert d is not None
        name = parts[-1]
        st = _lstat(name, d)
        same = st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=d) == link
        if not same:
            # Stored as-is and never followed by us; built aside then renamed in place.
            tmp = temp_name(name)
            os.symlink(link, tmp, dir_fd=d)
            try:
                self._replace(d, tmp, d, name)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=d)
                raise
        self._attrs_at(d, name, op)

    # -- walking -----------------------------------------------------------------------------

    def _scan_fd(self, fd: int, prefix: str) -> Iterator[Entry]:
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                name = e.name
                if is_temp_name(name):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                path = prefix + name
                mode = st.st_mode
                common = (st.st_size, st.st_mtime_ns, stat.S_IMODE(mode), st.st_uid, st.st_gid)
                if stat.S_ISDIR(mode):
                    yield Entry(path, "d", *common, nlink=st.st_nlink)
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue  # replaced by a non-directory meanwhile
                    yield from self._scan_fd(child, path + "/")
                elif stat.S_ISREG(mode):
                    yield Entry(path, "f", *common, nlink=st.st_nlink)
                elif stat.S_ISLNK(mode):
                    link = os.readlink(name, dir_fd=fd)
                    yield Entry(path, "l", *common, link=link, nlink=st.st_nlink)
        finally:
            os.close(fd)

    def _cleanup_fd(self, fd: int, live: set[str]) -> int:
        removed = 0
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    try:
                        child = os.open(e.name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue
                    removed += self._cleanup_fd(child, live)
                elif TEMP_MARK in e.name and is_temp_name(e.name) and e.name not in live:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.name, dir_fd=fd)
                        removed += 1
        finally:
            os.close(fd)
        return removed

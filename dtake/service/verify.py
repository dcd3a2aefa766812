"""Verification: compare the source tree with the target copy [L5260-5300].

By attributes (type, size, mtime, mode, owner, link target) or, with ``checksum``, by
a whole-file digest of every regular file (block hashes of the files that differ, to
count the bytes out of sync). With ``remirror`` the differing files are queued
again (a difference mirror restricted to what verification found), optionally only when
the source file is newer [L5276]. Orphans are processed as on a mirror [L5068].

Every verification appends to the source's verification log in the seed's format
[L5319-5393] (``<folder>/<RS name> DTVerify.log``, at most ``max_bytes``: once full,
nothing more is logged; ``append`` off overwrites it per run) — see
:func:`format_report`. :class:`VerifyScheduler` runs scheduled verifications (start
time + reverification interval [L5278-5299]) with an injectable clock.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from dtake.errors import DtakeError, E
from dtake.service.apply import _read_full as _read_into
from dtake.service.queue import LazyKind
from dtake.service.source import BLOCK

if TYPE_CHECKING:
    from dtake.service.daemon import Service
    from dtake.service.source import Connection

__all__ = [
    "FileAttrs",
    "VerifyLog",
    "VerifyReport",
    "VerifySchedule",
    "VerifyScheduler",
    "attr_mask",
    "format_report",
    "format_time",
    "verify_connection",
]

log = logging.getLogger("dtake.verify")

# Windows FILE_ATTRIBUTE_* values (seed-engine.md §11.5 DESIGN: the real bits).
READONLY, HIDDEN, DIRECTORY, NORMAL, SPARSE, REPARSE = 0x1, 0x2, 0x10, 0x80, 0x200, 0x400


def attr_mask(name: str, st: os.stat_result) -> int:
    """The Mask of the log [L5400-5420] derived from Linux metadata."""
    m = 0
    if not st.st_mode & 0o222:
        m |= READONLY
    if os.path.basename(name).startswith("."):
        m |= HIDDEN
    if stat.S_ISDIR(st.st_mode):
        m |= DIRECTORY
    if stat.S_ISLNK(st.st_mode):
        m |= REPARSE
    if stat.S_ISREG(st.st_mode) and st.st_blocks * 512 < st.st_size:
        m |= SPARSE
    return m or NORMAL


def format_time(epoch: float) -> str:
    """``1/24/2010 12:15:20 PM`` (no leading zeros on month, day and hour)."""
    t = time.localtime(epoch)
    h = t.tm_hour % 12 or 12
    return f"{t.tm_mon}/{t.tm_mday}/{t.tm_year} {h}:{t.tm_min:02}:{t.tm_sec:02} " + (
        "AM" if t.tm_hour < 12 else "PM"
    )


@dataclass
class FileAttrs:
    mtime: float
    size: int
    mask: int


@dataclass
class Difference:
    path: str  # as logged: relative to the volume root, no leading "/"
    rel: str  # relative to the replication set's base (JSON output)
    reason: str
    source: FileAttrs
    target: FileAttrs | None
    security_differs: bool = False
    bytes_out_of_sync: int = 0


@dataclass
class VerifyReport:
    con_id: int
    repset: str
    target_ip: str
    port: int
    start: float
    end: float = 0.0
    differences: list[Difference] = field(default_factory=list)
    dirs_compared: int = 0
    dirs_missing: int = 0
    dirs_remirrored: int = 0
    files_compared: int = 0
    files_missing: int = 0
    files_different: int = 0
    files_encrypted: int = 0
    files_remirrored: int = 0
    bytes_skipped: int = 0
    bytes_compared: int = 0
    bytes_missing: int = 0
    bytes_different: int = 0
    bytes_remirrored: int = 0


def format_report(r: VerifyReport) -> str:
    """The seed's verification log block [L5319-5393], one item per line."""
    conn = f"connection {r.con_id} ({r.repset} --> {r.target_ip} : {r.port})"
    lines = [
        f"--- VERIFICATION OF CONNECTION {r.con_id} ({r.repset} --> {r.target_ip} : {r.port}) ---",
        f"Start Time: {format_time(r.start)} for {conn}",
    ]
    for d in r.differences:
        lines.append(f"File:       {d.path} DIFFERENT ON TARGET")
        s, t = d.source, d.target or FileAttrs(0, 0, 0)
        lines.append(
            f"     Source Attributes: Timestamp = {format_time(s.mtime)} Size = {s.size} "
            f"Mask = [0x{s.mask:x}]"
        )
        lines.append(
            f"     Target Attributes: Timestamp = {format_time(t.mtime)} Size = {t.size} "
            f"Mask = [0x{t.mask:x}]"
        )
        if d.security_differs:
            lines.append("Security descriptors are different.")
        lines.append(f"      {d.bytes_out_of_sync} BYTES OUT OF SYNC")
    lines += [
        f"Completion Time: {format_time(r.end)} for {conn}",
        f"Elapsed Time (seconds): {r.end - r.start:.6f}",
        f"Total Directories Compared: {r.dirs_compared}",
        f"Total Directories Missing: {r.dirs_missing}",
        f"Total Directories Remirrored: {r.dirs_remirrored}",
        f"Total Files Compared: {r.files_compared}",
        f"Total Files Missing: {r.files_missing}",
        f"Total Files Different: {r.files_different}",
        f"Total Files Encrypted: {r.files_encrypted}",
        f"Total Files Remirrored: {r.files_remirrored}",
        f"Total Bytes Skipped: {r.bytes_skipped}",
        f"Total Bytes Compared: {r.bytes_compared}",
        f"Total Bytes Missing: {r.bytes_missing}",
        f"Total Bytes Different: {r.bytes_different}",
        f"Total Bytes Remirrored: {r.bytes_remirrored}",
        "Related links and directory attributes have been adjusted.",
        "----- END OF VERIFICATION -----",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class VerifyLog:
    """Settings of the source's Logging tab [L5303-5315] (all connections of a source)."""

    folder: str
    filename: str = "DTVerify.log"
    max_bytes: int = 1048576
    append: bool = True

    def path_for(self, repset: str) -> str:
        return os.path.join(self.folder, f"{repset} {self.filename}")

    def write(self, repset: str, text: str) -> str:
        """Append (or overwrite) within ``max_bytes``: at the limit logging stops."""
        path = self.path_for(repset)
        os.makedirs(self.folder, exist_ok=True)
        with open(path, "a" if self.append else "w", encoding="utf-8") as fh:
            size = fh.tell()
            for line in text.splitlines(keepends=True):
                n = len(line.encode("utf-8"))
                if size + n > self.max_bytes:
                    break
                fh.write(line)
                size += n
        return path


_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_buf = threading.local()


_CHUNK = 16 * BLOCK  # read 1 MiB at a time, hash it as 16 blocks


def _view() -> memoryview:
    """This thread's reusable read buffer (no allocation per file)."""
    buf: bytearray | None = getattr(_buf, "b", None)
    if buf is None:
        buf = _buf.b = bytearray(_CHUNK)
    return memoryview(buf)


def hash_blocks_fd(fd: int, size: int) -> list[int]:
    """xxh3_64 of each ``BLOCK`` of the first ``size`` bytes of ``fd`` (its size from
    fstat); equal to ``apply.block_hashes_fd`` for a file of that size, but reads of
    1 MiB (a sixteenth of the system calls, each of which lets another thread take the
    GIL) and none past the end: with many small files the extra read is a third of the
    cost. A file that shrank in the meantime yields the blocks it still has."""
    view = _view()
    digest = xxhash.xxh3_64_intdigest
    out: list[int] = []
    pos = 0
    while pos < size:
        want = min(_CHUNK, size - pos)
        got = _read_into(fd, view[:want])
        for off in range(0, got, BLOCK):
            out.append(digest(view[off : min(off + BLOCK, got)]))
        pos += got
        if got < want:
            break
    return out


def digest_fd(fd: int, size: int) -> bytes:
    """Whole-file xxh3_128 (16 bytes) of the first ``size`` bytes of ``fd``; equal to
    ``apply.file_digest_fd`` for a file of that size. What checksum verification
    compares: one digest per file (block lists only for the files that differ, to count
    the bytes out of sync); a file of up to one block is one ``read`` call."""
    if size <= BLOCK:
        data = os.read(fd, size)
        if len(data) == size or not data:
            return xxhash.xxh3_128_digest(data)
        h, pos = xxhash.xxh3_128(data), len(data)  # a short read: go on
    else:
        h, pos = xxhash.xxh3_128(), 0
    view = _view()
    while pos < size:
        want = min(_CHUNK, size - pos)
        got = _read_into(fd, view[:want])
        h.update(view[:got])
        pos += got
        if got < want:
            break
    return h.digest()


# How a file is hashed: whole-file digests (``digests_batch``) or block lists (the
# fallback ``hashes_batch`` of older peers, and the bytes out of sync of a difference).
DIGEST, BLOCKS = "digest", "blocks"
_HASHERS: dict[str, Callable[[int, int], Any]] = {DIGEST: digest_fd, BLOCKS: hash_blocks_fd}


def hash_files_at(
    dir_fd: int, names: list[str], how: str = BLOCKS, sizes: list[int] | None = None
) -> list[Any]:
    """Hashes of regular files in one open directory (None: no regular file).
    ``sizes``: the files' sizes from the source's walk, which found them regular: no
    fstat, and no more than that many bytes read (whatever the file is by then)."""
    fn = _HASHERS[how]
    out: list[Any] = []
    for k, name in enumerate(names):
        try:
            fd = os.open(name, _READ, dir_fd=dir_fd)
        except OSError:
            out.append(None)
            continue
        try:
            if sizes is not None:
                out.append(fn(fd, sizes[k]))
                continue
            st = os.fstat(fd)
            out.append(fn(fd, st.st_size) if stat.S_ISREG(st.st_mode) else None)
        except OSError:
            out.append(None)
        finally:
            os.close(fd)
    return out


def _by_dir(paths: list[str]) -> list[tuple[str, list[int]]]:
    """Consecutive runs of ``paths`` in the same directory: (directory, indexes)."""
    runs: list[tuple[str, list[int]]] = []
    last = None
    idx: list[int] = []
    for i, p in enumerate(paths):
        d = p[: p.rfind("/") + 1]
        if d != last:
            idx = []
            runs.append((d[:-1] if len(d) > 1 else d, idx))
            last = d
        idx.append(i)
    return runs


def _local_hashes_batch(
    paths: list[str], how: str = BLOCKS, sizes: list[int] | None = None
) -> list[Any]:
    """Hashes of source files (absolute paths), one directory open per run."""
    out: list[Any] = [None] * len(paths)
    for d, idx in _by_dir(paths):
        try:
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            names = [paths[i][paths[i].rfind("/") + 1 :] for i in idx]
            sz = None if sizes is None else [sizes[i] for i in idx]
            for i, h in zip(idx, hash_files_at(dfd, names, how, sz)):
                out[i] = h
        finally:
            os.close(dfd)
    return out


def _target_batch(tree: Any, rels: list[str], how: str) -> list[Any]:
    """The target's side of ``digests_batch``/``hashes_batch``: confined like every
    target access (each directory opened component by component from the target root,
    no symlinks). One hash (None: no regular file) per path, in order."""
    from dtake.service.apply import split_rel

    out: list[Any] = [None] * len(rels)
    for d, idx in _by_dir(rels):
        try:
            dfd = tree._open_dir(split_rel(d, allow_root=True), create=False)
        except (OSError, ValueError):
            dfd = None
        if dfd is None:
            continue
        try:
            names = [rels[i][rels[i].rfind("/") + 1 :] for i in idx]
            for i, h in zip(idx, hash_files_at(dfd, names, how)):
                out[i] = h
        finally:
            os.close(dfd)
    return out


def target_hashes_batch(tree: Any, rels: list[str]) -> dict[str, list[int] | None]:
    """``hashes_batch``: block hashes by path (the request of older sources)."""
    return dict(zip(rels, _target_batch(tree, rels, BLOCKS)))


def target_digests_batch(tree: Any, rels: list[str]) -> list[bytes | None]:
    """``digests_batch``: whole-file digests, in the order of ``rels``."""
    return _target_batch(tree, rels, DIGEST)


def _volume_rel(path: str, mounts: dict[str, str]) -> str:
    """Path relative to its filesystem's mount point (the seed drops the drive letter);
    ``mounts`` caches the mount point of each directory for one verification."""
    d = os.path.dirname(path)
    mp = mounts.get(d)
    if mp is None:
        mp = d
        while not os.path.ismount(mp) and mp != "/":
            mp = os.path.dirname(mp)
        mounts[d] = mp
    return os.path.relpath(path, mp)


def _out_of_sync(size: int, mine: Any, theirs: Any) -> int:
    """Bytes in blocks that differ; the whole file when there are no block lists to
    compare (attributes only, or unreadable)."""
    if not isinstance(mine, list) or not isinstance(theirs, list):
        return size
    n = 0
    for i, h in enumerate(mine):
        if i >= len(theirs) or theirs[i] != h:
            n += min(BLOCK, size - i * BLOCK)
    return n


# A target entry as the verification keeps it: a scan row [path, kind, size, mtime_ns,
# mode, uid, gid, link] (``scan`` with ``rows``; a peer sending dicts is converted).
Row = list[Any]
_KIND, _SIZE, _MTIME, _MODE, _UID, _GID, _LINK = 1, 2, 3, 4, 5, 6, 7


def _row(e: dict[str, Any]) -> Row:
    return [
        e["path"],
        e["kind"],
        e["size"],
        e["mtime_ns"],
        e.get("mode"),
        e.get("uid"),
        e.get("gid"),
        e.get("link"),
    ]


@dataclass(slots=True)
class _Entry:
    """One source entry compared with its target entry ``t``."""

    path: str
    rel: str
    st: os.stat_result
    kind: str  # f, l, d
    t: Row | None
    reason: str | None = None
    security: bool = False
    mine: Any = None  # digest (bytes) or block hashes (list) of the source file
    theirs: Any = None  # the same of the target file


# Checksum verification asks the target for the digests of many files per request
# (``digests_batch``, dtake.service.datafeatures) while this side hashes the same files:
# both sides read at once and no round trip per file. Batches are bounded so a response
# stays small and the two sides stay in step (replication ops queued behind a batch wait
# for one batch only).
BATCH_FILES = 512
BATCH_BYTES = 64 * 1024 * 1024
_INFLIGHT = 2  # requests outstanding: the target always has the next batch queued


class _RemoteHashes:
    """The target's hashes of a batch of files: ``digests_batch`` (one xxh3_128 per
    file), else ``hashes_batch`` (block lists; dtake before digests), else ``hashes``
    per file. A target that does not know a request answers -INVALID_COMMAND, and the
    next one is used from then on."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.how = DIGEST
        self.batched = True  # hashes_batch known

    def start(self, rels: list[str]) -> tuple[str, Any]:
        """Send the request for a batch now (answered in stream order, collected by
        ``wait``): the target works on it while this side is busy with others."""
        if self.how == DIGEST:
            return DIGEST, self.conn._request_start("digests_batch", paths=rels)
        return BLOCKS, self._start_blocks(rels)

    def _start_blocks(self, rels: list[str]) -> Any:
        if not self.batched:
            return None
        return self.conn._request_start("hashes_batch", paths=rels, block_size=BLOCK)

    def wait(self, rels: list[str], sent: tuple[str, Any]) -> tuple[str, list[Any]]:
        """(how, one hash or None per path) of a batch ``start`` sent."""
        how, pending = sent
        if how == DIGEST:
            try:
                last = self.conn._request_wait(*pending)[-1]
            except DtakeError as exc:
                if exc.code != E.INVALID_COMMAND:
                    raise
                self.how = BLOCKS
                return BLOCKS, self.blocks(rels)
            got = last.get("digests")
            return DIGEST, list(got) if got is not None else [None] * len(rels)
        return BLOCKS, self._wait_blocks(rels, pending)

    def blocks(self, rels: list[str]) -> list[Any]:
        """Block lists of the target's files (``hashes_batch``, else per file)."""
        return self._wait_blocks(rels, self._start_blocks(rels))

    def _wait_blocks(self, rels: list[str], pending: Any) -> list[Any]:
        if pending is not None:
            try:
                got = self.conn._request_wait(*pending)[-1].get("hashes") or {}
            except DtakeError as exc:
                if exc.code != E.INVALID_COMMAND:
                    raise
                self.batched = False
            else:
                return [list(got[r]) if got.get(r) is not None else None for r in rels]
        out: list[Any] = []
        for r in rels:
            last = self.conn._request("hashes", path=r, block_size=BLOCK)[-1]
            out.append(list(last.get("hashes") or []) if last.get("exists", True) else None)
        return out


class _Pipeline:
    """Verification as a stream: the target's scan is requested first, then each batch
    of files is requested as soon as the walk has cut it, and this side hashes the same
    files right away (in the walking thread: a hashing thread would contend with the
    walk for the GIL at every system call), so the target scans and hashes while this
    side walks and hashes its own copy; a batch is decided once the target's hashes are
    in. At most ``_INFLIGHT`` + 2 batches are held at once."""

    def __init__(self, conn: Connection, decide: Callable[[list[_Entry]], None]) -> None:
        self.conn = conn
        self.remote = _RemoteHashes(conn)
        self.decide = decide
        self._scan = conn._request_start("scan", rel="", rows=True)
        self._target: dict[str, Row] | None = None
        self._batch: list[_Entry] = []
        self._bytes = 0
        self._pending: list[tuple[list[_Entry], tuple[str, Any], list[Any]]] = []

    def target(self) -> dict[str, Row]:
        """The target's entries by path (waits for the end of its scan)."""
        if self._target is None:
            t: dict[str, Row] = {}
            for chunk in self.conn._request_chunks(*self._scan):
                rows = chunk.get("rows")
                if rows is None:  # a peer without compact rows sends dicts
                    rows = [_row(e) for e in chunk.get("entries") or ()]
                for row in rows:
                    t[row[0]] = row
            self._target = t
        return self._target

    def add(self, e: _Entry) -> None:
        self._batch.append(e)
        self._bytes += e.st.st_size
        if len(self._batch) >= BATCH_FILES or self._bytes >= BATCH_BYTES:
            self._flush()
            while len(self._pending) > _INFLIGHT + 1:
                self._finish_one()

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch, self._bytes = self._batch, [], 0
            sent = self.remote.start([e.rel for e in batch])
            mine = _local_hashes_batch(
                [e.path for e in batch], sent[0], [e.st.st_size for e in batch]
            )
            self._pending.append((batch, sent, mine))

    def _finish_one(self) -> None:
        batch, sent, mine = self._pending.pop(0)
        how, theirs = self.remote.wait([e.rel for e in batch], sent)
        if how != sent[0]:  # the target fell back to block lists: hash the same way
            mine = _local_hashes_batch([e.path for e in batch], how)
        for e, m, t in zip(batch, mine, theirs):
            e.mine, e.theirs = m, t
        self.decide(batch)
        for e in batch:
            e.mine = e.theirs = None  # memory: keep no hash past its decision

    def blocks(self, es: list[_Entry]) -> None:
        """Block lists of both copies of files found different (bytes out of sync)."""
        pending = self.remote._start_blocks([e.rel for e in es])
        mine = _local_hashes_batch([e.path for e in es], BLOCKS)
        theirs = self.remote._wait_blocks([e.rel for e in es], pending)
        for e, m, t in zip(es, mine, theirs):
            e.mine, e.theirs = m, t

    def finish(self) -> None:
        self._flush()
        while self._pending:
            self._finish_one()

    def close(self) -> None:
        """Drop what is still outstanding (after an error): the answers are ignored."""
        rids = [sent[1][0] for _b, sent, _m in self._pending if sent[1] is not None]
        if self._target is None:
            rids.append(self._scan[0])
        self.conn._request_drop(*rids)


def _compare(e: _Entry) -> None:
    """Set ``reason``/``security`` from the attributes."""
    t, st, kind = e.t, e.st, e.kind
    if t is None:
        e.reason = "missing on target"
        return
    if t[_KIND] != kind:
        e.reason = f"type differs ({kind} vs {t[_KIND]})"
        return
    if kind == "l":
        if t[_LINK] != os.readlink(e.path):
            e.reason = "link target differs"
        return
    if t[_SIZE] != st.st_size:
        e.reason = f"size differs ({st.st_size} vs {t[_SIZE]})"
    elif t[_MTIME] != st.st_mtime_ns:
        e.reason = "date/time differs"
    mode = stat.S_IMODE(st.st_mode)
    if t[_MODE] is not None and t[_MODE] != mode:
        e.security = True
    if (t[_UID], t[_GID]) != (st.st_uid, st.st_gid):
        e.security = True
    if e.reason is None and e.security:
        e.reason = "permissions differ" if t[_MODE] != mode else "owner differs"


def _content_may_differ(e: _Entry) -> bool:
    """A file found different in more than its permissions or owner: bytes of it may be
    out of sync (counted, and for digests compared by block lists first)."""
    return e.kind == "f" and e.reason not in ("permissions differ", "owner differs")


def _needs_blocks(e: _Entry) -> bool:
    """A file found different by digests: its block lists count the bytes out of sync."""
    return _content_may_differ(e) and isinstance(e.mine, bytes) and isinstance(e.theirs, bytes)


def verify_connection(
    conn: Connection,
    *,
    remirror: bool,
    checksum: bool,
    newer: bool = False,
    log_settings: VerifyLog | None = None,
) -> dict[str, Any]:
    if conn.mirror_status not in ("Idle",):
        raise DtakeError(E.MIRROR_ACTIVE, "Mirror currently active: verification cannot start")
    started = time.time()
    prev = conn.mirror_status
    conn.mirror_status = "Verifying"
    svc = conn.svc
    conn.svc.events.emit(94, con_id=conn.rec.id)
    rep = VerifyReport(conn.rec.id, conn.rec.repset, conn.rec.host, conn.rec.port, started)
    out_diffs: list[dict[str, Any]] = []
    mounts: dict[str, str] = {}

    def record(e: _Entry) -> None:
        """Count one difference, log it, and queue it again with ``remirror``."""
        st, t, kind = e.st, e.t, e.kind
        assert e.reason is not None
        if t is None:
            rep.files_missing += 1 if kind == "f" else 0
            rep.bytes_missing += st.st_size if kind == "f" else 0
        else:
            tattrs = FileAttrs(t[_MTIME] / 1e9, int(t[_SIZE]), _mask_of(e.rel, t))
            oos = 0
            if _content_may_differ(e):
                oos = _out_of_sync(st.st_size, e.mine, e.theirs)
            rep.files_different += 1
            rep.bytes_different += oos
            rep.differences.append(
                Difference(
                    _volume_rel(e.path, mounts),
                    e.rel,
                    e.reason,
                    FileAttrs(st.st_mtime_ns / 1e9, st.st_size, attr_mask(e.path, st)),
                    tattrs,
                    e.security,
                    oos,
                )
            )
        out_diffs.append({"path": e.rel, "reason": e.reason})
        if remirror and not (newer and t is not None and st.st_mtime_ns <= t[_MTIME]):
            lazy = {"f": LazyKind.CONTENT, "l": LazyKind.SYMLINK}[kind]
            conn.queue.put_lazy(lazy, e.path, mode="full" if kind == "f" else "realtime")
            if kind == "f":
                rep.files_remirrored += 1
                rep.bytes_remirrored += st.st_size

    try:

        def decide(batch: list[_Entry]) -> None:
            target = pipe.target()
            diffs: list[_Entry] = []
            for e in batch:
                t = e.t = target.get(e.rel)
                _compare(e)
                same = t is not None and t[_KIND] == "f" and t[_SIZE] == e.st.st_size
                if same and e.reason is None and (e.mine is None or e.mine != e.theirs):
                    e.reason = "checksum differs"
                if e.reason is not None:
                    diffs.append(e)
            need = [e for e in diffs if _needs_blocks(e)]
            if need:
                pipe.blocks(need)
            for e in diffs:
                record(e)

        pipe = _Pipeline(conn, decide)
        try:
            seen: set[str] = set()
            later: list[_Entry] = []  # decided once the scan is in (no hashes needed)
            prefix = conn.base.rstrip("/") + "/"  # Connection.rel, inlined (hot loop)
            cut = len(prefix)
            for path, st in conn._walk(conn.base):
                if path.startswith(prefix):
                    rel = path[cut:]
                elif path == conn.base:
                    rel = ""
                else:
                    continue
                seen.add(rel)
                fmt = st.st_mode & 0o170000
                kind = "d" if fmt == stat.S_IFDIR else "l" if fmt == stat.S_IFLNK else "f"
                if kind == "f":
                    if st.st_nlink > 1:
                        rep.bytes_skipped += st.st_size  # hard links are not replicated [L3756]
                        continue
                    rep.files_compared += 1
                    rep.bytes_compared += st.st_size
                e = _Entry(path, rel, st, kind, None)
                if checksum and kind == "f":
                    pipe.add(e)  # hashed on both sides while the walk goes on
                else:
                    later.append(e)
            pipe.finish()
            target = pipe.target()
        finally:
            pipe.close()
        for e in later:
            t = e.t = target.get(e.rel)
            if e.kind == "d":
                rep.dirs_compared += 1
                if t is None or t[_KIND] != "d":
                    rep.dirs_missing += 1
                    if remirror:
                        conn.queue.put_lazy(LazyKind.MKDIR, e.path, mode="realtime")
                        rep.dirs_remirrored += 1
                continue
            _compare(e)
            if e.reason is not None:
                record(e)
        orphans = sorted(p for p in target if p not in seen and p)
        if conn.rec.orphans != "off":
            from dtake.service.orphans import process_orphans

            process_orphans(
                conn,
                {p: (e[_KIND], e[_SIZE], e[_MTIME]) for p, e in target.items()},
                seen,
            )
    except BaseException:
        svc.events.emit(4061, target=conn.label, repset=conn.rec.repset, con_id=conn.rec.id)
        raise
    finally:
        conn.mirror_status = prev if prev != "Verifying" else "Idle"
    rep.end = time.time()
    settings = log_settings or _log_settings(svc)
    log_path = settings.write(conn.rec.repset, format_report(rep))
    svc.events.emit(95, con_id=conn.rec.id)
    if out_diffs:
        svc.events.emit(11007, details=f"{len(out_diffs)} difference(s), see {log_path}")
    return {
        "id": conn.rec.id,
        "checksum": checksum,
        "files_checked": rep.files_compared,
        "differences": out_diffs,
        "different": len(out_diffs),
        "orphans": orphans,
        "remirrored": rep.files_remirrored,
        "seconds": round(rep.end - started, 3),
        "log": log_path,
    }


def _mask_of(rel: str, t: Row) -> int:
    m = 0
    mode = t[_MODE]
    if mode is not None and not int(mode) & 0o222:
        m |= READONLY
    if os.path.basename(rel).startswith("."):
        m |= HIDDEN
    if t[_KIND] == "d":
        m |= DIRECTORY
    if t[_KIND] == "l":
        m |= REPARSE
    return m or NORMAL


def _log_settings(svc: Service) -> VerifyLog:
    feat = svc.features.get("dtake.service.datafeatures")
    cfg = getattr(feat, "cfg", None)
    if cfg is None:
        return VerifyLog(folder=svc.cfg.state_dir)
    return VerifyLog(
        folder=cfg.verify_log_folder,
        filename=cfg.verify_log_filename,
        max_bytes=cfg.verify_log_max_bytes,
        append=cfg.verify_log_append,
    )


# ---------------------------------------------------------------------------- schedule
UNITS = {"minutes": 60, "hours": 3600, "days": 86400}


@dataclass
class VerifySchedule:
    """Connection Manager -> Verify tab [L5278-5299]."""

    next_due: float
    interval_s: float = 0.0  # 0 = once (no reverification interval)
    remirror: bool = False
    newer: bool = False
    checksum: bool = False
    enabled: bool = True

    def due(self, now: float) -> bool:
        """True when a run is due; advances (and coalesces missed runs) or disables."""
        if not self.enabled or now < self.next_due:
            return False
        if self.interval_s > 0:
            steps = int((now - self.next_due) // self.interval_s) + 1
            self.next_due += steps * self.interval_s
        else:
            self.enabled = False
        return True


class VerifyScheduler:
    def __init__(self, svc: Service, cfg: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.svc = svc
        self.clock = clock
        raw = svc.store.load("verify_schedules.json", {}) or {}
        self.schedules: dict[int, VerifySchedule] = {
            int(k): VerifySchedule(**v) for k, v in raw.items()
        }
        self._running: set[int] = set()
        self._lock = threading.Lock()

    def _save(self) -> None:
        with self._lock:
            doc = {str(k): asdict(v) for k, v in self.schedules.items()}
        self.svc.store.save("verify_schedules.json", doc)

    def set(
        self,
        con_id: int,
        *,
        start: float | None = None,
        interval: float = 0,
        unit: str = "minutes",
        remirror: bool = False,
        newer: bool = False,
        checksum: bool = False,
        enabled: bool = True,
        remove: bool = False,
    ) -> dict[str, Any]:
        self.svc._conn(con_id)  # -107 when there is no such connection
        if remove:
            with self._lock:
                self.schedules.pop(con_id, None)
            self._save()
            return {"id": con_id, "schedule": None}
        if unit not in UNITS:
            raise DtakeError(E.INVALID_OPTION, f"unit must be one of {', '.join(UNITS)}")
        if newer and not remirror:
            raise DtakeError(E.INVALID_OPTION, "--newer applies only with --remirror [L5290]")
        sch = VerifySchedule(
            next_due=float(start) if start is not None else self.clock(),
            interval_s=float(interval) * UNITS[unit],
            remirror=remirror,
            newer=newer,
            checksum=checksum,
            enabled=enabled,
        )
        with self._lock:
            self.schedules[con_id] = sch
        self._save()
        return {"id": con_id, "schedule": asdict(sch)}

    def tick(self) -> list[int]:
        """Start the verifications that are due (each in its own thread)."""
        now = self.clock()
        started: list[int] = []
        with self._lock:
            items = list(self.schedules.items())
        for con_id, sch in items:
            conn = self.svc.connections.get(con_id)
            if conn is None or con_id in self._running:
                continue
            if conn.mirror_status != "Idle" or conn._fs is None:
                continue  # "any time a mirror is not in progress" [L5268]; try next second
            if not sch.due(now):
                continue
            self._save()
            started.append(con_id)
            self._running.add(con_id)
            threading.Thread(
                target=self._run, args=(conn, sch), name=f"verify-{con_id}", daemon=True
            ).start()
        return started

    def _run(self, conn: Connection, sch: VerifySchedule) -> None:
        ev = {"target": conn.label, "repset": conn.rec.repset, "con_id": conn.rec.id}
        try:
            self.svc.events.emit(4058, **ev)
            verify_connection(conn, remirror=sch.remirror, checksum=sch.checksum, newer=sch.newer)
            self.svc.events.emit(4062, **ev)
        except Exception as exc:
            log.warning("scheduled verification of connection %d failed: %s", conn.rec.id, exc)
        finally:
            self._running.discard(conn.rec.id)

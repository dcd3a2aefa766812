"""Transaction logs of one connection's source queue (DiskQueueFolder [L4950-4956]).

Layout: ``<folder>/<target>_<port>_<conid>_<uuid12>_<nnnnnnnn>.dtq`` — the seed names
its logs after the target address, the connection ID and an increasing sequence
number [L4951]; the connection's persistent UUID is added because display IDs can be
reused. Next to them ``<...>_<uuid12>.meta`` (JSON) says whether the logs can be trusted
after a restart.

A log is a series of records ``<u32 length><u32 crc32><msgpack payload>``, each written
with one ``write(2)`` (or several in one: ``append_many``, a mirror walk's slice): a
record is never split across logs (a log ends at ~5 MB or
when the next record would not fit; a record bigger than that gets a log of its own)
[L4954]. The payload is opaque here (``dtake.service.queue`` encodes items).

Write-through, why: the seed keeps the oldest items only in memory, so a crash of the
service loses them. Here every item is appended when it is queued and memory is a
bounded cache of the head of the logs; ``write(2)`` to the page cache survives a kill
-9 of the service, so the queue is replayed after one (a write the kill cuts short
leaves an incomplete last record: the reload cuts it, see ``_reload``). A host crash (power loss) can
lose unsynced pages: the boot id in the meta file detects it and the logs are then
not trusted (the caller falls back to Mirror Required + a difference mirror).

Limits: DiskQueueMaxSize bounds the part of the queue that lives *only* on disk
(as in the seed, where memory holds the head); DiskFreeSpaceMin is checked against
every write, with ``statvfs`` refreshed at least every 64 KiB written (and before
every write within 4 MiB of the floor) [L4950-4956,
L4975]. Either limit reached = "queue exhausted" (``append`` returns False).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOG_SIZE",
    "DiskJournal",
    "JournalReader",
    "boot_id",
    "journal_prefix",
]

log = logging.getLogger("dtake.queue")

LOG_SIZE = 5 * 1024 * 1024  # seed: transaction logs of 5 MB [L4951]
_REC = struct.Struct("<II")  # length, crc32(payload)
_STATVFS_EVERY = 64 * 1024  # other writers may fill the volume too
_NEAR_FLOOR = 4 * 1024 * 1024  # close to the floor: statvfs before every write
_READ_CHUNK = 256 * 1024
MAX_RECORD = 256 * 1024 * 1024

StatVfs = Callable[[str], Any]


def boot_id() -> str:
    """This boot's id: a different one after a host crash means unsynced pages are lost."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def journal_prefix(host: str, port: int, con_id: int, conn_uuid: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9.-]", "-", host) or "target"
    return f"{safe}_{port}_{con_id}_{conn_uuid[:12]}"


@dataclass
class _LogFile:
    seq: int
    path: str
    size: int = 0
    records: int = 0
    last_order: int = 0


class JournalReader:
    """Sequential reader over the logs, from the oldest record not yet in memory."""

    def __init__(self, journal: DiskJournal) -> None:
        self._j = journal
        self.file_index = 0  # index into journal.files
        self.offset = 0
        self._buf = b""
        self._buf_off = 0  # file offset of _buf[0]

    def reset(self) -> None:
        self.file_index = 0
        self.offset = 0
        self._buf = b""
        self._buf_off = 0

    def next(self) -> bytes | None:
        """The next payload, or None when the reader has caught up with the writer."""
        j = self._j
        while self.file_index < len(j.files):
            lf = j.files[self.file_index]
            rec = self._read_at(lf)
            if rec is not None:
                return rec
            if self.file_index == len(j.files) - 1:
                return None  # the file still being written: wait for more
            self.file_index += 1
            self.offset = 0
            self._buf = b""
            self._buf_off = 0
        return None

    def _read_at(self, lf: _LogFile) -> bytes | None:
        if self.offset >= lf.size:
            return None
        need_hdr = self._fill(lf, _REC.size)
        if not need_hdr:
            return None
        start = self.offset - self._buf_off
        length, crc = _REC.unpack_from(self._buf, start)
        if not self._fill(lf, _REC.size + length):
            return None
        start = self.offset - self._buf_off
        payload = self._buf[start + _REC.size : start + _REC.size + length]
        if zlib.crc32(payload) != crc:
            raise OSError(f"{lf.path}: corrupt record at offset {self.offset}")
        self.offset += _REC.size + length
        return payload

    def _fill(self, lf: _LogFile, n: int) -> bool:
        if self.offset + n > lf.size:
            return False
        have = self._buf_off + len(self._buf) - self.offset
        if self._buf_off <= self.offset and have >= n:
            return True
        want = max(n, _READ_CHUNK)
        with open(lf.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(min(want, lf.size - self.offset))
        self._buf = data
        self._buf_off = self.offset
        return len(data) >= n


class DiskJournal:
    """Append-only transaction logs with the seed's size limits.

    ``statvfs`` is injectable so the free-space floor can be tested without filling a
    disk. ``max_bytes`` None = UNLIMITED.
    """

    def __init__(
        self,
        folder: str,
        prefix: str,
        *,
        max_bytes: int | None,
        free_min_bytes: int,
        log_size: int = LOG_SIZE,
        statvfs: StatVfs = os.statvfs,
    ) -> None:
        self.folder = folder
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.free_min_bytes = free_min_bytes
        self.log_size = log_size
        self._statvfs = statvfs
        self.files: list[_LogFile] = []
        self._fd: int | None = None
        self._free_est = 0
        self._since_statvfs = _STATVFS_EVERY  # forces a statvfs at the first write
        self.qid = ""
        self.acked_order = 0
        self.trusted = False  # True when logs from before a restart may be replayed
        self.reloaded_records = 0
        self.exhausted_reason = ""
        os.makedirs(folder, exist_ok=True)

    # ------------------------------------------------------------------ files
    @property
    def meta_path(self) -> str:
        return os.path.join(self.folder, f"{self.prefix}.meta")

    def _log_path(self, seq: int) -> str:
        return os.path.join(self.folder, f"{self.prefix}_{seq:08d}.dtq")

    def existing(self) -> list[tuple[int, str]]:
        pat = re.compile(re.escape(self.prefix) + r"_(\d{8})\.dtq$")
        out = []
        for name in os.listdir(self.folder):
            m = pat.match(name)
            if m:
                out.append((int(m.group(1)), os.path.join(self.folder, name)))
        return sorted(out)

    def open(self, scan: Callable[[bytes], int] | None = None) -> None:
        """Load or create the logs. ``scan(payload) -> order`` is called for every
        reloaded record (in order) when the logs are trusted."""
        meta = self._read_meta()
        old = self.existing()
        trusted = bool(meta) and (meta.get("clean") or meta.get("boot_id") == boot_id())
        if old and trusted:
            try:
                self._reload(old, scan, killed=not meta.get("clean"))
                self.trusted = True
            except (OSError, ValueError) as exc:
                log.warning("queue logs %s not usable: %s", self.prefix, exc)
                self.trusted = False
        if not self.trusted:
            if old:
                log.warning(
                    "queue logs %s cannot be trusted (unclean stop on another boot or "
                    "damaged): discarded",
                    self.prefix,
                )
            self._remove_all()
            self.files = []
            self.qid = uuidlib.uuid4().hex
            self.acked_order = 0
        else:
            self.qid = str(meta.get("qid") or uuidlib.uuid4().hex)
            self.acked_order = int(meta.get("acked_order", 0))
        self.save_meta(clean=False)

    def _reload(
        self, old: list[tuple[int, str]], scan: Callable[[bytes], int] | None, *, killed: bool
    ) -> None:
        """``killed``: the service did not stop cleanly (same boot). A kill -9 can stop a
        write(2) part way: the kernel checks for a fatal signal between the pages it
        copies, so a record crossing a page boundary (or an ``append_many``) can end
        short. Such an incomplete record at the end of the last log is what was being
        written when the service died: it is cut, the complete ones before it are kept
        (losing it is like a change made just after the kill, which the restart's
        difference mirror covers). Anywhere else, or after a clean stop, it is damage."""
        files: list[_LogFile] = []
        for seq, path in old:
            lf = _LogFile(seq, path, os.path.getsize(path))
            files.append(lf)
        self.files = files
        reader = JournalReader(self)
        for i, lf in enumerate(files):
            # A fresh buffer per log: the previous log's must not be read as this one's.
            reader.file_index, reader.offset, reader._buf, reader._buf_off = i, 0, b"", 0
            while True:
                payload = reader._read_at(lf)
                if payload is None:
                    break
                self.reloaded_records += 1
                lf.records += 1
                if scan is not None:
                    lf.last_order = scan(payload)
            if reader.offset != lf.size:
                # A torn record (crc mismatches raised already: this one is incomplete).
                if not killed or i != len(files) - 1:
                    raise ValueError(f"{lf.path}: torn record at offset {reader.offset}")
                log.warning(
                    "queue log %s: incomplete last record at offset %d (the service was "
                    "killed while writing it): cut",
                    lf.path,
                    reader.offset,
                )
                os.truncate(lf.path, reader.offset)
                lf.size = reader.offset

    def _read_meta(self) -> dict[str, Any]:
        try:
            with open(self.meta_path, encoding="utf-8") as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_meta(self, *, clean: bool) -> None:
        tmp = self.meta_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "qid": self.qid,
                    "boot_id": boot_id(),
                    "clean": clean,
                    "acked_order": self.acked_order,
                },
                fh,
            )
            if clean:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.meta_path)

    def _remove_all(self) -> None:
        for _, path in self.existing():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ writing
    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def free_bytes(self) -> int:
        st = self._statvfs(self.folder)
        return int(st.f_bavail) * int(st.f_frsize)

    def check_space(self, n: int, only_on_disk: int) -> bool:
        """May ``n`` more bytes be written? ``only_on_disk`` = bytes of items held only
        on disk (what DiskQueueMaxSize limits)."""
        if self.max_bytes is not None and only_on_disk + n > self.max_bytes:
            self.exhausted_reason = "disk queue limit (DiskQueueMaxSize) reached"
            return False
        if (
            self._since_statvfs >= _STATVFS_EVERY
            or self._free_est - n < self.free_min_bytes + _NEAR_FLOOR
        ):
            self._free_est = self.free_bytes()
            self._since_statvfs = 0
        if self._free_est - n < self.free_min_bytes:
            self.exhausted_reason = "free space on the queue volume below DiskFreeSpaceMin"
            return False
        return True

    def append(self, payload: bytes, order: int) -> int:
        """Write one record; returns its size on disk. Call ``check_space`` first."""
        rec = _REC.pack(len(payload), zlib.crc32(payload)) + payload
        cur = self.files[-1] if self.files else None
        if cur is None or (cur.size > 0 and cur.size + len(rec) > self.log_size):
            cur = self._roll()
        elif self._fd is None:
            self._reopen_last()  # first write after a reload
        assert self._fd is not None
        n = os.write(self._fd, rec)
        if n != len(rec):  # a short write to a regular file = the disk is full
            os.ftruncate(self._fd, cur.size)
            raise OSError(f"{cur.path}: short write")
        cur.size += n
        cur.records += 1
        cur.last_order = order
        self._since_statvfs += n
        self._free_est -= n
        return n

    def append_many(self, records: list[tuple[bytes, int]]) -> int:
        """Write several records (payload, order) with one ``write(2)`` per log they
        land in (a log still ends at ~5 MB; no record is split). The durability point
        is the same as ``append``'s: every record is in the page cache when this
        returns. Returns the bytes written. Call ``check_space`` (for all) first."""
        total = 0
        i = 0
        while i < len(records):
            cur = self.files[-1] if self.files else None
            if cur is None or (
                cur.size > 0 and cur.size + _REC.size + len(records[i][0]) > self.log_size
            ):
                cur = self._roll()
            elif self._fd is None:
                self._reopen_last()
            assert self._fd is not None
            parts: list[bytes] = []
            size = cur.size
            last = cur.last_order
            while i < len(records):
                payload, order = records[i]
                n = _REC.size + len(payload)
                if parts and size + n > self.log_size:
                    break  # the next log takes it
                parts.append(_REC.pack(len(payload), zlib.crc32(payload)))
                parts.append(payload)
                size += n
                last = order
                i += 1
            buf = b"".join(parts)
            n = os.write(self._fd, buf)
            if n != len(buf):  # a short write to a regular file = the disk is full
                os.ftruncate(self._fd, cur.size)
                raise OSError(f"{cur.path}: short write")
            cur.size = size
            cur.records += len(parts) // 2
            cur.last_order = last
            self._since_statvfs += n
            self._free_est -= n
            total += n
        return total

    def _roll(self) -> _LogFile:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        seq = (self.files[-1].seq + 1) if self.files else 1
        lf = _LogFile(seq, self._log_path(seq))
        self._fd = os.open(
            lf.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_TRUNC, 0o600
        )
        self.files.append(lf)
        return lf

    def _reopen_last(self) -> None:
        if self._fd is None and self.files:
            self._fd = os.open(self.files[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    # ------------------------------------------------------------------ trimming
    def release(self, order: int, *, reader: JournalReader) -> int:
        """Every item up to ``order`` is acknowledged: delete logs that hold nothing else
        and that the reader has passed. Returns the number of logs deleted."""
        removed = 0
        if order > self.acked_order:
            self.acked_order = order
        while len(self.files) > 1 and self.files[0].last_order <= order and reader.file_index > 0:
            lf = self.files.pop(0)
            reader.file_index -= 1
            try:
                os.unlink(lf.path)
            except FileNotFoundError:
                pass
            removed += 1
        if removed:
            self.save_meta(clean=False)
        return removed

    def clear(self, reader: JournalReader) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._remove_all()
        self.files = []
        reader.reset()
        self.save_meta(clean=False)

    def close(self, *, clean: bool) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        self.save_meta(clean=clean)

    def discard(self) -> None:
        """The connection is gone: delete its logs and meta file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._remove_all()
        for p in (self.meta_path,):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.files = []

    def iter_files(self) -> Iterator[str]:
        return (f.path for f in self.files)

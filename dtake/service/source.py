"""Source side of one connection: queue -> materialise ops -> send -> acks.

One worker thread per connection owns the socket's send side; a reader thread handles
ACK and RESPONSE frames. Mirrors run in their own thread and only *enqueue* items
(after the capture is already running, so nothing changed during the walk is missed).

States follow the seed [L4922-4938, L2962-2984]: transmit Started/Stopped/Paused/Error,
mirror Idle/Mirroring/nn%/Paused/Waiting/Verifying, replication Replicating/Ready/
Pending/Stopped, target data state OK/Mirroring/Mirror Required.
"""

from __future__ import annotations

import errno
import logging
import operator
import os
import socket
import stat
import threading
import time
import uuid as uuidlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import xxhash

from dtake.errors import DtakeError, E
from dtake.ops import Op, OpKind
from dtake.protocol.opwire import FILES_FEATURE
from dtake.rules import RuleSet
from dtake.service import datastate
from dtake.service.apply import TEMP_MARK, is_temp_name
from dtake.service.datastate import DataEvent
from dtake.service.hardlinks import SkippedLinks
from dtake.service.journal import ResyncState, journal_resync
from dtake.service.queue import (
    NAME_OVERHEAD,
    OP_OVERHEAD,
    TAGS_OVERHEAD,
    Item,
    LazyKind,
    SourceQueue,
    op_cost,
)
from dtake.service.smallfiles import FILES_OP_FILES, Prefetch, read_files
from dtake.service.transmit import TransmitControl
from dtake.service.vanished import VanishedPaths

if TYPE_CHECKING:
    from dtake.service.daemon import Service

__all__ = ["BLOCK", "ConnRecord", "Connection"]

log = logging.getLogger("dtake.source")

BLOCK = 64 * 1024  # checksum block (DESIGN: 64 KiB, xxh3_64)
CHUNK = 1024 * 1024  # data per WRITE op
SMALL_FILE = 256 * 1024  # up to this, a file goes as one op (FILE_END tagged "whole")
BATCH_BYTES = 4 * 1024 * 1024
BATCH_OPS = 512
SEND_TAKE = 32  # queue items the sender takes at a time
WINDOW_BYTES = 64 * 1024 * 1024  # unacknowledged bytes in flight (at most)
MIN_CHUNK = 4 * 1024
WALK_SLICE = 1024  # mirror walk: entries per list (a huge directory comes in slices)
SENT_INO_MAX = 16384  # recent sends whose inode a RENAME checks (_recheck_rename)
WALK_PUT = 256  # mirror walk: items queued per put_lazy_many (one lock, one log write)
BIG_FILE = 1024 * 1024  # above this, real-time changes send changed blocks only
SIG_CACHE_MAX_BLOCKS = 4 * 1024 * 1024
# A mirror's small files go as FILES ops, one per directory slice (dtake.ops): files up
# to FILES_FILE_MAX bytes, at most FILES_OP_FILES of them and about FILES_OP_BYTES of data
# an op (FILES_OP_FILES names a queue item, too). Modes that compare by hashes do not.
FILES_FILE_MAX = 64 * 1024
FILES_OP_BYTES = 1024 * 1024
FILES_MODES = frozenset({"full", "differences", "newer"})
ACK_TAG = "ak"  # on the last op of a frame: acknowledge right after applying it

MIRROR_MODES = ("full", "differences", "checksum", "newer", "none")


@dataclass
class ConnRecord:
    """What persists of a connection (state_dir/connections.json)."""

    id: int
    repset: str
    host: str
    port: int
    target_path: str
    mirror: str = "differences"
    orphans: str = "off"  # off | log | delete
    compression: str = "none"
    compression_level: int | None = None
    uuid: str = field(default_factory=lambda: uuidlib.uuid4().hex)
    target_data_state: str = "Mirror Required"
    transmit: str = "Started"  # user intent: Started | Stopped | Paused
    auto_reconnect: bool = True
    block: bool = False  # block the target path while connected [L5001]
    orphans_age_s: float = 0.0  # only orphans not modified within this [L5094]
    # A restoration connection [L4719] (dtake.service.restoreconn): its own rules (the
    # set mapped onto this node's copy) and where it restores to; None otherwise.
    restore: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Gap(Exception):
    """The target cannot continue from where we are: a difference mirror is needed."""


class Connection:
    def __init__(self, svc: Service, rec: ConnRecord, rules: RuleSet) -> None:
        self.svc = svc
        self.rec = rec
        self.rules = rules
        self.base = rules.base()
        self.queue = SourceQueue.for_connection(svc.cfg.queue, rec.host, rec.port, rec.id, rec.uuid)
        self.tx = TransmitControl(self)  # transmission, recovery (dtake.service.transmit)
        # The in-flight window counts against the queue's memory limit (QMemoryBufferMax):
        # a quarter of it (at most WINDOW_BYTES), data chunks at most a sixteenth (a 1 MB
        # limit still works, with smaller writes). The queue keeps the window plus the
        # largest op for it, so queued + in flight stays within the limit.
        limit = self.queue.max_bytes
        self.chunk = max(MIN_CHUNK, min(CHUNK, limit // 16) // MIN_CHUNK * MIN_CHUNK)
        self.small_file = min(SMALL_FILE, self.chunk)
        self.window_bytes = max(2 * self.chunk, min(WINDOW_BYTES, limit // 4))
        self.batch_bytes = min(BATCH_BYTES, self.window_bytes // 4)
        self.files_file_max = min(FILES_FILE_MAX, self.small_file)
        self.files_op_bytes = min(FILES_OP_BYTES, self.batch_bytes)
        largest_op = max(self.chunk, BLOCK) + OP_OVERHEAD + TAGS_OVERHEAD + 2 * 4096
        self.queue.reserve(self.window_bytes + largest_op)
        self._item_order = 0  # queue item whose first op is next (replay position)
        self.epoch = uuidlib.uuid4().hex
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._ack_cond = threading.Condition(self._lock)
        # Held while a batch is taken and sent, so batches reach the socket in sequence
        # order whichever thread flushes (the worker, or a mirror sending a request).
        self._send_lock = threading.RLock()
        self._connected = threading.Event()  # set while a session is open
        self._fs: Any = None  # FrameSocket while connected
        self._reader: threading.Thread | None = None
        self._worker = threading.Thread(target=self._run, name=f"conn-{rec.id}", daemon=True)
        self._mirror_thread: threading.Thread | None = None
        self._mirror_cancel = threading.Event()
        self._mirror_pause = threading.Event()
        self._codec: Any = None
        self._peer_files = False  # the target accepts FILES ops (its open response)
        self._prefetch_cond = threading.Condition()  # FILES items read ahead by the walk
        # sequence numbers
        self.next_seq = 1
        self.acked_seq = 0
        self._inflight: deque[tuple[int, Op]] = deque()
        self._inflight_bytes = 0
        self._batch: list[Op] = []
        self._sent_notes: list[tuple[int, int]] = []  # queue.note_sent, one call a frame
        self._holding = 0  # items the sender took from the queue and has not finished
        self._batch_bytes = 0
        self._unasked = 0  # bytes sent since the last frame that asked for an early ACK
        self._resp: dict[int, list[Any]] = {}
        self._req_id = 0
        # state
        self.connected_since: float | None = None
        self.peer_node: str | None = None
        self.last_error: str | None = None
        self.mirror_status = "Idle"
        self.mirror_total = 0
        self.mirror_sent = 0
        self.mirror_mode_running: str | None = None
        self.mirror_end_seq: int | None = None
        self.mirror_queued_done = False
        self.replication = "Replicating"
        # Why the data state last changed, and what the target must do (datastate.py).
        self.data_state_reason = ""
        self.data_state_snapshot = False
        self.data_state_override = False
        self._needs_resync = False
        self._sigs: dict[str, tuple[int, list[int]]] = {}
        self._sig_blocks = 0
        # Files skipped as hard-linked (reported once, event 4099), until sent: sent once
        # one name is left (hardlinks.py).
        self._skipped_links = SkippedLinks()
        # Paths the sender found gone, until a RENAME or DELETE explains it (vanished.py).
        self._vanished = VanishedPaths()
        # Which file (inode) was last sent under a path, for the recent sends: a RENAME
        # of that path whose destination is now another file sends it (_recheck_rename).
        self._sent_ino: OrderedDict[str, int] = OrderedDict()
        self._sent_name: dict[int, str] = {}  # inode -> path, for _sent_ino (_note_sent)
        # Change journal resync: token presented at open, verdict, method shown in status.
        self.resync = ResyncState()
        # Counters read by dtake.service.metrics (with .get(key, 0)); all ints except
        # last_file_touched (the set-relative path of the last op sent).
        self.stats: dict[str, Any] = {
            "ops_sent": 0,
            "bytes_sent": 0,
            "files_sent": 0,
            "mirror_bytes_sent": 0,
            "mirror_files_skipped": 0,
            "mirror_bytes_skipped": 0,
            "replication_ops": 0,
            "blocks_skipped": 0,
            "reconnects": 0,
            "remirrors": 0,
            "read_failures": 0,
            "resent_ops": 0,  # ops sent again from the in-flight window after a reconnect
            "mirror_failures": 0,  # files a mirror could not send (unreadable, or refused)
            "vanished_resent": 0,  # paths found gone when read, sent after their RENAME
            "replaced_resent": 0,  # renamed files whose old name was read as another file
            "relinked_sent": 0,  # files skipped as hard-linked, sent once down to one name
            "last_file_touched": "",
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, mirror: str | None) -> None:
        self._worker.start()
        if mirror and mirror != "none":
            self.start_mirror(mirror)
        elif self.rec.target_data_state != "OK":
            self.mirror_status = "Idle"

    def stop(self, *, timeout: float = 5.0) -> None:
        self._stop.set()
        self._mirror_cancel.set()
        self.queue.notify()
        self._close_socket()
        self._worker.join(timeout)
        self.queue.close(clean=True)  # the logs stay for the next start

    @property
    def label(self) -> str:
        return f"{self.rec.host}:{self.rec.port}"

    # ------------------------------------------------------------------ paths
    def rel(self, abspath: str) -> str | None:
        """Source absolute path -> path relative to the replication set's base."""
        if abspath == self.base:
            return ""
        if not abspath.startswith(self.base.rstrip("/") + "/"):
            return None
        return abspath[len(self.base.rstrip("/")) + 1 :]

    # ------------------------------------------------------------------ capture side
    def on_change(
        self, kind: str, path: str, *, is_dir: bool = False, dest: str | None = None
    ) -> None:
        """Called by the capture thread for events inside this connection's set."""
        if self.replication == "Stopped" or not self.tx.accepting():
            return
        ok = True
        q = self.queue
        if kind in ("created", "modified", "closed_write"):
            ok = q.put_lazy(LazyKind.CONTENT, path)
        elif kind == "mkdir":
            ok = q.put_lazy(LazyKind.MKDIR, path)
        elif kind == "attrib":
            ok = q.put_lazy(LazyKind.ATTRS, path)
        elif kind == "symlink":
            ok = q.put_lazy(LazyKind.SYMLINK, path)
        elif kind == "deleted":
            r = self.rel(path)
            if r:
                ok = q.put_delete(path, Op(OpKind.DELETE, r))
        elif kind == "moved" and dest is not None:
            src_in = self.rules.matches(path, is_dir=is_dir)
            dst_in = self.rules.matches(dest, is_dir=is_dir)
            rs, rd = self.rel(path), self.rel(dest)
            if src_in and dst_in and rs and rd:
                # Items only on disk are not moved (queue.py); a directory created
                # so recently that its rescan may have missed it is walked again.
                resend = q.disk_may_hold(path) or (is_dir and q.pending(LazyKind.MKDIR, path))
                ok = q.put_rename(path, dest, Op(OpKind.RENAME, rs, new_path=rd))
                if self.mirror_status != "Idle" or resend:
                    # A mirror may already have sent `dest` and the rename would put
                    # older data over it: re-send what is at `dest` now.
                    self._enqueue_subtree(dest, "realtime")
            elif src_in and rs:
                ok = q.put_delete(path, Op(OpKind.DELETE, rs))
            elif dst_in:
                ok = self._enqueue_subtree(dest, "realtime")
        if not ok:
            self.tx.exhausted(self.queue.exhausted_reason or "queue exhausted")

    def _enqueue_subtree(self, top: str, mode: str) -> bool:
        try:
            st = os.lstat(top)
        except OSError:
            return True
        if stat.S_ISDIR(st.st_mode):
            ok = self.queue.put_lazy(LazyKind.MKDIR, top)
            for entry in self._walk(top):
                ok = ok and self._enqueue_entry(entry[0], entry[1], mode)
            return ok
        return self._enqueue_entry(top, st, mode)

    def _enqueue_entry(self, path: str, st: os.stat_result, mode: str) -> bool:
        """Queue one entry (moved into the set, or below such a directory) by the mirror
        walk's kind rules (``_entry_kind``)."""
        kind = self._entry_kind(path, st)
        if kind is None:
            return True
        return self.queue.put_lazy(kind, path, mode=mode, ino=st.st_ino)

    def _entry_kind(self, path: str, st: os.stat_result) -> str | None:
        """The queue item an entry goes as, by its ``lstat``: one copy of the kind rules
        for the mirror walk, the journal replay's new directories and real time. A
        directory is MKDIR, a symbolic link SYMLINK, a hard-linked file nothing (event
        4099 [L3756]), anything else CONTENT: the sender sends a regular file and drops
        a FIFO, socket or device when it reads it (as after a real-time creation)."""
        fmt = st.st_mode & 0o170000
        if fmt == stat.S_IFDIR:
            return LazyKind.MKDIR
        if fmt == stat.S_IFLNK:
            return LazyKind.SYMLINK
        if st.st_nlink > 1:
            self._warn_hardlink(path, st)
            return None
        return LazyKind.CONTENT

    def _walk(self, top: str) -> Iterator[tuple[str, os.stat_result]]:
        """Entries below `top` selected by the rules (dirs before their contents)."""
        for chunk in self._walk_dirs(top):
            yield from chunk

    def _walk_dirs(self, top: str) -> Iterator[list[tuple[str, os.stat_result]]]:
        """``_walk``'s entries, in the same order, a directory (at most ``WALK_SLICE``
        entries) per list: one generator step per directory, not per entry."""
        stack = [top]
        seen: set[tuple[int, int]] = set()
        matches, may_contain = self.rules.matches, self.rules.dir_may_contain
        all_included = self.rules.all_included
        internal = self.svc.is_internal
        by_name = operator.attrgetter("name")
        IFMT, IFDIR = 0o170000, stat.S_IFDIR
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    entries = sorted(it, key=by_name)
            except OSError:
                continue
            out: list[tuple[str, os.stat_result]] = []
            every = all_included(d)  # no entry here needs the rules one by one
            for e in entries:
                if TEMP_MARK in e.name and is_temp_name(e.name):
                    continue  # a target's transfer in progress (chained topology)
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                path = e.path
                if st.st_mode & IFMT == IFDIR:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue  # mount cycle (seed-engine §3.4)
                    seen.add(key)
                    if internal(path):
                        continue
                    if every or matches(path, is_dir=True):
                        out.append((path, st))
                    if may_contain(path):
                        stack.append(path)
                elif every or matches(path):
                    out.append((path, st))
                if len(out) >= WALK_SLICE:
                    yield out
                    out = []
            if out:
                yield out

    def gap(self, why: str, *, event: int = 51001) -> None:
        """A gap in the change stream: Mirror Required, then an automatic difference mirror."""
        log.warning("connection %d: %s: Mirror Required", self.rec.id, why)
        self.svc.events.emit(event, con_id=self.rec.id)
        self.queue.clear()
        self._vanished.clear()
        self._sent_ino.clear()
        self._sigs.clear()
        self._sig_blocks = 0
        datastate.source_event(self, DataEvent.OPS_LOST, why)
        self.replication = "Pending"
        if self.svc.cfg.auto_remirror and self.rec.target_data_state not in datastate.HOLD:
            self.stats["remirrors"] += 1
            self.start_mirror(self.svc.cfg.auto_remirror_mode, restart=True)

    def set_data_state(self, value: str) -> None:
        # Written before the data changes (write-ahead): a crash cannot leave a stale "OK".
        old = self.rec.target_data_state
        if old != value:
            self.rec.target_data_state = value
            self.svc.save_connections()
            self.svc.data_state_changed(self, old, value)

    # ------------------------------------------------------------------ mirror
    def start_mirror(self, mode: str, *, restart: bool = False, override: bool = False) -> None:
        """``override``: a user's mirror, which also overrides Restore Required [L5618]."""
        if mode not in MIRROR_MODES or mode == "none":
            raise DtakeError(E.INVALID_OPTION, f"unknown mirror mode {mode!r}")
        if self.rec.target_data_state in datastate.HOLD and not override:
            self.replication = "Pending"
            self.svc.events.emit(4018, what=f"Mirror of connection {self.rec.id}")
            return
        with self._lock:
            running = self._mirror_thread is not None and self._mirror_thread.is_alive()
            if running and not restart:
                raise DtakeError(E.MIRROR_ALREADY_ACTIVE, "Mirror already active")
            if running:
                self._mirror_cancel.set()
        if running and self._mirror_thread is not None:
            self._mirror_thread.join()
        with self._lock:
            self._mirror_cancel = threading.Event()
            self._mirror_pause.clear()
            self.mirror_status = "Mirroring"
            self.mirror_mode_running = mode
            self.mirror_total = 0
            self.mirror_sent = 0
            self.mirror_end_seq = None
            self.mirror_queued_done = False
        # Outside _lock: announcing the state flushes the batch under _send_lock, and the
        # sender takes _send_lock then _lock (lock order send -> connection).
        datastate.source_event(
            self, DataEvent.MIRROR_OVERRIDE if override else DataEvent.MIRROR_STARTED
        )
        with self._lock:
            t = threading.Thread(
                target=self._mirror_run,
                args=(mode, self._mirror_cancel),
                name=f"mirror-{self.rec.id}",
                daemon=True,
            )
            self._mirror_thread = t
        self.svc.events.emit(89, con_id=self.rec.id)
        self.svc.events.emit(4019, target=self.label, repset=self.rec.repset, con_id=self.rec.id)
        t.start()

    def stop_mirror(self) -> None:
        with self._lock:
            if self.mirror_status == "Idle":
                raise DtakeError(E.MIRROR_NOT_RUNNING, "Mirror is not running")
            self._mirror_cancel.set()
            self._mirror_pause.clear()
            self.mirror_status = "Idle"
            self.mirror_end_seq = None
        datastate.source_event(self, DataEvent.MIRROR_STOPPED)
        self.svc.events.emit(90, con_id=self.rec.id)
        self.svc.events.emit(4022, target=self.label, repset=self.rec.repset, con_id=self.rec.id)

    def pause_mirror(self) -> None:
        if self.mirror_status == "Idle":
            raise DtakeError(E.MIRROR_NOT_RUNNING, "Mirror is not running")
        self._mirror_pause.set()
        self.mirror_status = "Paused"
        self.svc.events.emit(91, con_id=self.rec.id)

    def resume_mirror(self) -> None:
        if not self._mirror_pause.is_set():
            raise DtakeError(E.MIRROR_NOT_PAUSED, "Mirror is not paused")
        self._mirror_pause.clear()
        self.mirror_status = "Mirroring"
        self.svc.events.emit(92, con_id=self.rec.id)

    def _mirror_run(self, mode: str, cancel: threading.Event) -> None:
        try:
            while not cancel.is_set() and not self._stop.is_set():
                try:
                    self._mirror_walk(mode, cancel)
                    return
                except _Gap:
                    # Connection lost during the walk: walk again once reconnected
                    # (queued items are deduplicated; nothing is sent twice needlessly).
                    if self.queue.overflowed:
                        self.tx.exhausted(self.queue.exhausted_reason or "queue exhausted")
                        return
                    self._stop.wait(0.2)
        except Exception as exc:  # a failed mirror is visible, never silent
            log.exception("connection %d: mirror failed", self.rec.id)
            self.last_error = f"mirror failed: {exc}"
            if not cancel.is_set():
                self.mirror_status = "Idle"
                datastate.source_event(self, DataEvent.MIRROR_STOPPED, str(exc))

    def _wait_connected(self, cancel: threading.Event) -> bool:
        while not cancel.is_set() and not self._stop.is_set():
            if self._connected.wait(0.5) and self._fs is not None:
                return True
        return False

    def _mirror_walk(self, mode: str, cancel: threading.Event) -> None:
        if journal_resync(self, mode, cancel):
            return  # replayed the change journal of a clean disconnect (journal.py)
        target: dict[str, tuple[str, int, int]] = {}
        same: set[str] = set()  # entries the target already has (compared: skipped)
        track_seen = self.rec.orphans != "off"  # only orphan detection needs these
        cut = len(self.base.rstrip("/")) + 1  # walked paths are below the base
        IFMT, IFDIR, IFLNK = 0o170000, stat.S_IFDIR, stat.S_IFLNK
        full, diff, newer = mode == "full", mode == "differences", mode == "newer"
        walk: Iterable[list[tuple[str, os.stat_result]]] = self._walk_dirs(self.base)
        if mode in ("differences", "newer", "checksum") or track_seen:
            if not self._wait_connected(cancel):
                return
            # The target scans while this side walks (two machines, or two cores). The
            # source's entries are collected, then each chunk of the target's rows is
            # compared as it arrives (the comparison overlaps the rest of the scan).
            pending = self._request_start("scan", rel="", rows=True, short=True)
            walk = list(walk)
            mine: dict[str, os.stat_result] = (
                {} if full else {p[cut:]: st for ch in walk for p, st in ch}
            )
            for answer in self._request_chunks(*pending):
                rows = answer.get("rows") or [
                    (e["path"], e["kind"], e["size"], e["mtime_ns"])  # a peer sending dicts
                    for e in answer.get("entries") or ()
                ]
                for row in rows:
                    rel, tkind, tsize, tmtime = row[0], row[1], row[2], row[3]
                    if track_seen:
                        target[rel] = (tkind, tsize, tmtime)
                    mst = mine.get(rel)
                    if mst is None:
                        continue
                    # Same rules on both sides: size and mtime of every file (differences),
                    # mtime (newer), kind always; a hard-linked file is never "same" (the
                    # walk below warns about it).
                    fmt = mst.st_mode & IFMT
                    if fmt == IFDIR:
                        if tkind == "d" and tmtime == mst.st_mtime_ns:
                            same.add(rel)
                    elif fmt == IFLNK:
                        if tkind == "l":
                            same.add(rel)
                    elif tkind == "f" and mst.st_nlink == 1:
                        if diff:
                            if tsize == mst.st_size and tmtime == mst.st_mtime_ns:
                                same.add(rel)
                        elif newer and mst.st_mtime_ns <= tmtime:
                            same.add(rel)
            mine.clear()
        seen: set[str] = set()
        total = 0
        if not cancel.is_set():
            self.queue.put_lazy(LazyKind.MKDIR, self.base, mode="full")
        stopped = self._stop
        skipped_files = skipped_bytes = 0
        # Directories whose entries this mirror writes: creating or renaming an entry
        # moves a directory's mtime on the target after its MKDIR set it, so their
        # attributes are sent again once everything below them is queued (as rsync -a).
        touched: set[str] = set()
        for chunk in walk:
            # pause/cancel checks once per directory (the loops below are kept tight)
            self._mirror_hold(cancel)
            if cancel.is_set() or stopped.is_set():
                return
            parent = os.path.dirname(chunk[0][0])  # a chunk is one directory's entries
            if track_seen:
                seen.update(path[cut:] for path, _ in chunk)
            if same:
                kept: list[tuple[str, os.stat_result]] = []
                for entry in chunk:
                    if entry[0][cut:] in same:
                        skipped_files += 1
                        skipped_bytes += entry[1].st_size
                    else:
                        kept.append(entry)
                chunk = kept
            done = self._queue_walked(chunk, mode, total, cancel)
            if done is None:
                return
            total, wrote = done
            if wrote:
                touched.add(parent)
        for d in sorted(touched, key=lambda p: -p.count("/")):  # deepest first
            self._mirror_hold(cancel)
            if cancel.is_set() or stopped.is_set():
                return
            self.queue.wait_room(lambda: cancel.is_set() or stopped.is_set())
            if not self.queue.put_lazy(LazyKind.ATTRS, d, mode="full"):
                raise _Gap()
        self.stats["mirror_files_skipped"] += skipped_files
        self.stats["mirror_bytes_skipped"] += skipped_bytes
        if self.rec.orphans != "off" and not cancel.is_set():
            from dtake.service.orphans import process_orphans

            process_orphans(self, target, seen)  # [L5064-5095]
        if not cancel.is_set():
            self.mirror_queued_done = True
            self.queue.put_marker(LazyKind.MIRROR_END, mode=mode)

    def _mirror_hold(self, cancel: threading.Event) -> None:
        """While the mirror is paused (``dtake mirror pause``), wait: a mirror queues
        nothing more until it is resumed, cancelled or the connection stops. What it
        queued before goes on being sent."""
        while self._mirror_pause.is_set() and not cancel.is_set() and not self._stop.is_set():
            time.sleep(0.05)

    def _queue_walked(
        self,
        chunk: list[tuple[str, os.stat_result]],
        mode: str,
        total: int,
        cancel: threading.Event,
        *,
        big_mode: str | None = None,
    ) -> tuple[int, bool] | None:
        """Queue walked entries (a ``_walk_dirs`` list) by the mirror walk's kind rules
        (``_entry_kind``): directories and symbolic links in mode "full", CONTENT in
        ``mode`` (``big_mode``, if given, for files of BIG_FILE bytes or more). They go
        in slices of ``put_lazy_many`` (one lock round trip and one log write each),
        small enough for a small queue's flow control, with the inode the walk saw.
        ``total``: the file bytes counted so far (``mirror_total``, set before each
        slice goes). Returns ``total`` with these files added and whether anything was
        queued; None when the mirror was cancelled."""
        kind_of, CONTENT = self._entry_kind, LazyKind.CONTENT
        slice_items = max(1, min(WALK_PUT, self.queue.budget // 16 // 1024))
        wrote = False
        batch: list[tuple[str, str, str, int]] = []
        # Small regular files (not sparse) go by name in FILES items, after the rest.
        names: list[str] = []
        sizes: list[int] = []
        small = self.files_file_max if mode in FILES_MODES and chunk else -1
        parent = os.path.dirname(chunk[0][0]) if chunk else ""
        cut = len(parent.rstrip("/")) + 1
        IFMT, IFREG = 0o170000, stat.S_IFREG
        for path, st in chunk:
            kind = kind_of(path, st)
            if kind is None:
                continue
            if kind == CONTENT:
                size = st.st_size
                total += size
                if size <= small and st.st_mode & IFMT == IFREG and st.st_blocks * 512 >= size:
                    names.append(path[cut:])
                    sizes.append(size)
                    continue
                m = big_mode if big_mode is not None and size >= BIG_FILE else mode
                batch.append((CONTENT, path, m, st.st_ino))
            else:
                batch.append((kind, path, "full", st.st_ino))
            if len(batch) >= slice_items:
                self.mirror_total = total  # before the sender can count the bytes
                if not self._put_walked(batch, cancel):
                    return None
                wrote = True
                batch = []
        if batch:
            self.mirror_total = total
            if not self._put_walked(batch, cancel):
                return None
            wrote = True
        if names:
            self.mirror_total = total
            # An item of about one op (FILES_OP_FILES files or files_op_bytes bytes),
            # and of at most an eighth of the queue's memory: its cost counts the
            # names, and the data when it is to be read ahead (the target takes FILES).
            ahead = self._peer_files
            i, limit, cap = 0, self.files_op_bytes, max(1, self.queue.budget // 8)
            while i < len(names):
                j = i
                nbytes = cost = 0
                while j < len(names) and j - i < FILES_OP_FILES and nbytes < limit and cost < cap:
                    nbytes += sizes[j]
                    cost += NAME_OVERHEAD + len(names[j]) + (sizes[j] if ahead else 0)
                    j += 1
                if not self._put_walked_files(
                    parent, names[i:j], sizes[i:j] if ahead else None, mode, cancel
                ):
                    return None
                i = j
            wrote = True
        return total, wrote

    def _put_walked(self, batch: list[tuple[str, str, str, int]], cancel: threading.Event) -> bool:
        """Queue a slice of the mirror walk; False when the mirror was cancelled. Flow
        control: the walk never fills the queue (it would exhaust it and loop through
        auto-disconnect); it waits for the sender instead."""
        if not self._walk_room(cancel):
            return False
        if not self.queue.put_lazy_many(batch):
            raise _Gap()
        return True

    def _walk_room(self, cancel: threading.Event) -> bool:
        """Flow control of the mirror walk: wait for room in the queue; False when the
        mirror was cancelled or the connection stops meanwhile."""
        stopped = self._stop
        self.queue.wait_room(lambda: cancel.is_set() or stopped.is_set())
        return not (cancel.is_set() or stopped.is_set())

    def _put_walked_files(
        self,
        parent: str,
        names: list[str],
        file_sizes: list[int] | None,
        mode: str,
        cancel: threading.Event,
    ) -> bool:
        """``_put_walked`` for a FILES item (small files of directory ``parent``);
        ``file_sizes``: their sizes by the walk's ``lstat``, to read them ahead of the
        sender when the item is held in memory (dtake.service.smallfiles); the data
        then counts in the item's cost."""
        if not self._walk_room(cancel):
            return False
        pf = Prefetch() if file_sizes is not None else None
        ok, held, moved = self.queue.put_files(
            parent, names, mode=mode, data_bytes=sum(file_sizes or ()), prefetch=pf
        )
        if not ok:
            raise _Gap()
        if moved and file_sizes is not None:  # queued one by one (see put_files)
            gone = set(moved)
            kept = [(n, z) for n, z in zip(names, file_sizes, strict=True) if n not in gone]
            names, file_sizes = [n for n, _ in kept], [z for _, z in kept]
        if pf is not None and held and pf.start(self._prefetch_cond):
            got = None
            try:
                got = read_files(
                    parent, names, self.files_file_max, self.files_op_bytes, file_sizes
                )
            finally:
                pf.done(self._prefetch_cond, got)
        return True

    def _warn_hardlink(self, path: str, st: os.stat_result) -> None:
        # Once per path while it stays skipped (a mirror walks it again), again after it
        # was sent with one name and linked anew.
        if self._skipped_links.add(path, st.st_ino):
            self.svc.events.emit(4099, path=path)

    # ------------------------------------------------------------------ requests
    def _request(self, op: str, *, wait_s: float = 300.0, **args: Any) -> list[Any]:
        """Send a request frame and collect its response chunks (answered in stream order);
        ``wait_s``: how long the peer may stay silent before -SERVER_NOT_RESPONDING."""
        return self._request_wait(*self._request_start(op, **args), wait_s=wait_s)

    def _request_start(self, op: str, **args: Any) -> tuple[int, Any]:
        """Send a request (after the ops queued before it); ``_request_wait`` collects."""
        from dtake.protocol.framing import MsgType

        fs = self._fs
        if fs is None:
            raise _Gap()
        with self._lock:
            self._req_id += 1
            rid = self._req_id
            self._resp[rid] = []
        with self._send_lock:
            self._flush_batch()
            fs.send_obj(MsgType.REQUEST, {"id": rid, "op": op, **args})
        return rid, fs

    def _request_wait(self, rid: int, fs: Any, *, wait_s: float = 300.0) -> list[Any]:
        return list(self._request_chunks(rid, fs, wait_s=wait_s))

    def _request_chunks(
        self, rid: int, fs: Any, *, wait_s: float = 300.0
    ) -> Iterator[dict[str, Any]]:
        """``_request_wait``, chunk by chunk as they arrive (a long answer is used while
        the rest of it is still coming)."""
        try:
            while True:
                deadline = time.monotonic() + wait_s
                with self._ack_cond:
                    while True:
                        box = self._resp.get(rid)
                        if box:
                            got = list(box)
                            box.clear()
                            break
                        if box is None or self._fs is not fs or self._stop.is_set():
                            raise _Gap()
                        if time.monotonic() > deadline:
                            raise DtakeError(E.SERVER_NOT_RESPONDING, "Server is not responding")
                        self._ack_cond.wait(0.5)
                for c in got:
                    if c.get("error"):
                        raise DtakeError(int(c.get("code", E.UNKNOWN)), str(c["error"]))
                    yield c
                    if c.get("more") is False:
                        return
        finally:
            self._request_drop(rid)

    def _request_drop(self, *rids: int) -> None:
        """Forget requests' response boxes: their answers, if still coming, are ignored."""
        with self._ack_cond:
            for rid in rids:
                self._resp.pop(rid, None)

    def request_scan(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for chunk in self._request("scan", rel=""):
            out.extend(chunk.get("entries", []))
        return out

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                gate = self.tx.gate()  # transmit state, schedule, recovery
                if gate == "Stopped":
                    self._close_socket()
                    time.sleep(0.1)
                    continue
                if self._fs is None:
                    self.tx.before_connect()
                    if not self._connect():
                        self._stop.wait(self.tx.connect_failed())
                    else:
                        self.tx.connected()
                    continue
                if gate == "Paused" or self.rec.target_data_state in datastate.HOLD:
                    self._flush_batch()
                    time.sleep(0.1)
                    continue
                # A few items per lock round trip (the gates above are checked again
                # after them): small files cost the sender ~20 us each.
                items = self.queue.get_many(SEND_TAKE, timeout=0 if self._batch else 0.2)
                if not items:
                    self._flush_batch()
                    continue
                self._send_taken(items)
            except _Gap:
                continue
            except (OSError, EOFError) as exc:
                self._lost(str(exc))
            except Exception as exc:
                from dtake.protocol.errors import ProtocolError

                if isinstance(exc, ProtocolError):
                    self._lost(str(exc))
                    continue
                log.exception("connection %d: worker error", self.rec.id)
                self.last_error = str(exc)
                self._lost(str(exc))

    def _send_taken(self, items: list[Item]) -> None:
        """Process the items taken from the queue, in order. When the connection is lost
        in the middle of an item (the socket was gone at an emit, or a send failed),
        what was sent is resent from the in-flight window and the item, with those taken
        after it, goes back to the queue: it is processed again from its start after the
        reconnect (every op kind is replay-safe, a FILE_BEGIN restarts a transfer), so
        no resync is needed. Any other failure drops only the failing item (replaying it
        would fail again); the items after it go back."""
        from dtake.protocol.errors import ProtocolError

        try:
            for k, item in enumerate(items):
                # Taken, not finished: still queued as far as idle() and the status go.
                self._holding = len(items) - k
                try:
                    self._item_order = item.order
                    self._process(item)
                except _Gap:
                    self.queue.unget_many(items[k:])
                    raise
                except ProtocolError as exc:
                    lost = getattr(exc, "reason", None) == "SEND_FAILED"
                    self.queue.unget_many(items[k:] if lost else items[k + 1 :])
                    raise
                except BaseException:
                    self.queue.unget_many(items[k + 1 :])
                    raise
        finally:
            self._holding = 0

    def _connect(self) -> bool:
        from dtake.protocol.auth import client_handshake
        from dtake.protocol.compress import get_codec
        from dtake.protocol.framing import FrameSocket, MsgType

        if self.last_error is None:
            self.svc.events.emit(71, target=self.label)
        try:
            sock = socket.create_connection((self.rec.host, self.rec.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fs = FrameSocket(sock)
            peer = client_handshake(
                fs, self.svc.key, node_id=self.svc.node_id, info={"conn": self.rec.uuid}
            )
            self.peer_node = peer.node_id
            extra: dict[str, Any] = {}  # other features' fields (replica generation)
            for name, feat in list(self.svc.features.items()):
                if hasattr(feat, "open_fields") and name != "dtake.service.datafeatures":
                    extra.update(feat.open_fields(self))
            fs.send_obj(
                MsgType.REQUEST,
                {
                    "id": 0,
                    "op": "open",
                    "uuid": self.rec.uuid,
                    "epoch": self.epoch,
                    "conn_id": self.rec.id,
                    "repset": self.rec.repset,
                    "target_path": self.rec.target_path,
                    "source_node": self.svc.node_id,
                    "source_base": self.base,
                    **datastate.open_fields(self),
                    **extra,
                    **self.svc.journals.open_fields(self),  # detach_token (journal.py)
                },
            )
            mtype, resp = fs.recv_obj(timeout=30)
            if mtype != MsgType.RESPONSE or resp.get("error"):
                raise DtakeError(
                    int(resp.get("code", E.CONNECTION_FAILED)),
                    str(resp.get("error", "open refused")),
                )
        except DtakeError as exc:
            self._set_error(str(exc))
            return False
        except Exception as exc:
            self._set_error(f"Connection failed: {exc}")
            return False
        target_last = int(resp.get("last_seq", 0))
        self._peer_files = FILES_FEATURE in (resp.get("features") or ())
        self.tx.opened(resp)  # where a reloaded queue resumes
        datastate.on_open_response(self, resp)
        self.svc.journals.on_open_response(self, resp)
        self._codec = get_codec(self.rec.compression, self.rec.compression_level)
        with self._lock:
            gap = False
            if target_last < self.acked_seq:
                gap = True  # the target lost applied ops (restart): resync
            # (an in-flight entry is keyed by its op's last sequence number: a FILES op
            # takes one per file; op.seq is its first)
            resend = [(s, op) for s, op in self._inflight if s > target_last]
            if self._inflight and target_last < self._inflight[0][1].seq - 1:
                gap = True
            if not self._peer_files and any(op.kind is OpKind.FILES for _, op in resend):
                gap = True  # the target no longer takes FILES ops: resync instead
            self._fs = fs
            self._connected.set()
            self.connected_since = time.time()
            self.last_error = None
            self.acked_seq = max(self.acked_seq, target_last)
            if gap:
                self._inflight.clear()
                self._inflight_bytes = 0
                self.queue.inflight_bytes = 0
                self.next_seq = max(self.next_seq, target_last + 1)
        self._reader = threading.Thread(
            target=self._read_loop, args=(fs,), name=f"acks-{self.rec.id}", daemon=True
        )
        self._reader.start()
        self.svc.events.emit(73, target=self.label)
        self.svc.events.emit(4016, target=self.label, repset=self.rec.repset, con_id=self.rec.id)
        if resend and not gap:
            from dtake.protocol.opwire import encode_ops

            self.stats["resent_ops"] += len(resend)
            for i in range(0, len(resend), BATCH_OPS):
                fs.send_parts(
                    MsgType.OPS_DATA,
                    encode_ops(op for _, op in resend[i : i + BATCH_OPS]),
                    compress=self._codec,
                )
        if gap or self._needs_resync:
            self._needs_resync = False
            self.gap(
                "target lost its position after a restart"
                if gap
                else "connection lost mid-transfer"
            )
        return True

    def _set_error(self, msg: str) -> None:
        if self.last_error != msg:  # log a failure once, not at every retry
            self.svc.events.emit(76, target=self.label)
            log.warning("connection %d: %s", self.rec.id, msg)
        self.last_error = msg

    def _lost(self, why: str) -> None:
        if self._fs is not None:
            self.svc.events.emit(77, target=self.label)
            self.stats["reconnects"] += 1
        self.last_error = f"Connection lost: {why}"
        self._close_socket()

    def _close_socket(self) -> None:
        with self._ack_cond:
            fs, self._fs = self._fs, None
            self._connected.clear()
            self.connected_since = None
            self._batch.clear()  # resent from the in-flight window (their notes stay)
            self._batch_bytes = 0
            self._ack_cond.notify_all()
        if fs is not None:
            try:
                fs.close()
            except OSError:
                pass

    def _read_loop(self, fs: Any) -> None:
        from dtake.protocol.framing import MsgType

        try:
            while True:
                mtype, obj = fs.recv_obj(timeout=None)
                if mtype == MsgType.ACK:
                    self.tx.ack_info(obj)  # target queue figures
                    self._on_ack(int(obj["seq"]), obj.get("failed") or [])
                elif mtype == MsgType.RESPONSE:
                    with self._ack_cond:
                        if obj.get("id") in self._resp:
                            self._resp[obj["id"]].append(obj)
                        self._ack_cond.notify_all()
                elif mtype == MsgType.PING:
                    fs.send_obj(MsgType.PONG, {})
                elif mtype == MsgType.ERROR:
                    raise EOFError(str(obj))
        except Exception as exc:
            if self._fs is fs:
                self._lost(str(exc))

    def _on_ack(self, seq: int, failed: list[dict[str, Any]]) -> None:
        self.queue.acked(seq)  # trims the queue's logs
        in_mirror = self.mirror_status != "Idle"  # this ack may complete the mirror
        with self._ack_cond:
            if seq > self.acked_seq:
                self.acked_seq = seq
            while self._inflight and self._inflight[0][0] <= seq:
                _, op = self._inflight.popleft()
                self._inflight_bytes -= op_cost(op)
                if (
                    op.kind == OpKind.BARRIER
                    and op.tags.get("mirror_end")
                    and self.mirror_end_seq == op.seq
                ):
                    self._mirror_done()
            self.queue.inflight_bytes = self._inflight_bytes
            self._ack_cond.notify_all()
        for f in failed:
            if in_mirror:
                self.stats["mirror_failures"] += 1  # a mirror's file the target refused
            self.svc.events.emit(4150, path=str(f.get("path")), error=str(f.get("error")))
            datastate.source_event(self, DataEvent.WRITE_DROPPED, str(f.get("path")))

    def _mirror_done(self) -> None:
        self.mirror_status = "Idle"
        self.mirror_end_seq = None
        self.mirror_mode_running = None
        datastate.source_event(self, DataEvent.MIRROR_COMPLETE)
        if self.replication == "Pending":
            self.replication = "Replicating"
        self.svc.events.emit(93, con_id=self.rec.id)
        self.svc.events.emit(4023, target=self.label, repset=self.rec.repset, con_id=self.rec.id)

    # ------------------------------------------------------------------ materialise
    def _process(self, item: Item) -> None:
        if item.op is not None:
            self._emit(item.op)
            if item.op.kind in (OpKind.RENAME, OpKind.DELETE):
                # A name went: what the sender remembers about names may send more.
                if self._skipped_links:
                    self._recheck_links(item.op)
                if self._sent_ino:
                    self._recheck_rename(item.op)
                if self._vanished:
                    self._explain_vanished(item.op)
            return
        path = item.path
        if item.lazy == LazyKind.FILES:
            self._send_files(item)
            return
        if item.lazy == LazyKind.MIRROR_END:
            op = Op(OpKind.BARRIER, "", tags={"mirror_end": True})
            self._emit(op)
            with self._lock:
                self.mirror_end_seq = op.seq
                if self.mirror_status not in ("Idle",):
                    self.mirror_status = "Waiting"
            self._flush_batch()
            return
        r = self.rel(path)
        if r is None:
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            # A later DELETE/RENAME in the queue tells the target; until then the
            # path is remembered: a RENAME must also send what was never sent.
            self._note_vanished(path, item.lazy or "")
            return
        except OSError:
            self.stats["read_failures"] += 1
            if item.mode != "realtime":
                self.stats["mirror_failures"] += 1
            return
        if item.lazy == LazyKind.MKDIR:
            if stat.S_ISDIR(st.st_mode):
                self._emit(_attr_op(OpKind.MKDIR, r, st))
            return
        if item.lazy == LazyKind.SYMLINK or stat.S_ISLNK(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                try:
                    link = os.readlink(path)
                except OSError:
                    return
                self._emit(
                    Op(
                        OpKind.SYMLINK,
                        r,
                        link=link,
                        uid=st.st_uid,
                        gid=st.st_gid,
                        mtime_ns=st.st_mtime_ns,
                    )
                )
            return
        if item.lazy == LazyKind.ATTRS:
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                return
            if self._skipped_links and self._send_relinked(path, r, item.mode, st):
                return
            self._emit(_attr_op(OpKind.ATTRS, r, st))
            return
        if item.lazy == LazyKind.CONTENT:
            if stat.S_ISDIR(st.st_mode):
                self._emit(_attr_op(OpKind.MKDIR, r, st))
                return
            if not stat.S_ISREG(st.st_mode):
                return
            if st.st_nlink > 1:
                self._warn_hardlink(path, st)
                return
            self._send_file(path, r, item.mode, st)

    def _send_files(self, item: Item) -> None:
        """A FILES item: its small files as FILES ops, read ahead by the walk or read
        now (dtake.service.smallfiles). A file found gone is remembered as vanished
        (its RENAME or DELETE, queued after, explains it); one that is no longer a small
        regular file with one link, or could not be read there, goes the per-file way
        (``_process``), which sends, reports or counts it as for any mirror entry."""
        d = item.path
        names: list[str] = item.meta.get("names") or []
        prefix = d if d.endswith("/") else d + "/"
        r = self.rel(d)
        if r is None:
            return
        if not self._peer_files:  # a target of an older version
            self._send_each(prefix, names, item.mode)
            return
        pf = item.prefetch
        got = pf.take(self._prefetch_cond) if pf is not None else None
        if got is None:
            got = read_files(d, names, self.files_file_max, self.files_op_bytes)
        mirror = item.mode != "realtime"
        sigs = self._sigs
        for entries, data, inos in got.batches:
            # (the batch's buffer as it was read: a bytearray, sent as it is)
            self._emit(Op(OpKind.FILES, r, data=cast(bytes, data), tags={"files": entries}))
            self.stats["files_sent"] += len(entries)
            if mirror:
                self.mirror_sent += len(data)
                self.stats["mirror_bytes_sent"] += len(data)
            for entry, ino in zip(entries, inos, strict=True):
                path = prefix + entry[0]
                self._note_sent(path, ino)
                if sigs and path in sigs:
                    self._remember_sig(path, 0, None)
        if got.batches:
            last = got.batches[-1][0][-1][0]
            self.stats["last_file_touched"] = f"{r}/{last}" if r else last
        for name in got.vanished:
            self._note_vanished(prefix + name, LazyKind.CONTENT)
        self._send_each(prefix, got.rest, item.mode)

    def _send_each(self, prefix: str, names: list[str], mode: str) -> None:
        """Files of a FILES item the per-file way, as CONTENT items of the mirror."""
        for name in names:
            self._process(Item(0, lazy=LazyKind.CONTENT, path=prefix + name, mode=mode))

    def _note_vanished(self, path: str, kind: str) -> None:
        if not self._vanished.add(path, kind):
            self._vanished.clear()
            self.gap("too many paths vanished before they were sent")

    def _explain_vanished(self, op: Op) -> None:
        """After a RENAME or DELETE: forget the vanished paths it covers; for a RENAME,
        first send what is now at their new names (dtake.service.vanished)."""
        base = self.base.rstrip("/")
        src = f"{base}/{op.path}" if op.path else base
        hits = self._vanished.under(src)
        if op.kind == OpKind.RENAME and op.new_path and hits:
            self.stats["vanished_resent"] += len(hits)
            dst = f"{base}/{op.new_path}"
            walked: list[str] = []
            for p, kind in hits:  # a directory before what is below it
                q = dst + p[len(src) :]
                if any(q == w or q.startswith(w + "/") for w in walked):
                    continue  # sent with its directory
                if not self.rules.matches(q, is_dir=kind == LazyKind.MKDIR):
                    continue  # excluded under its new name
                if kind == LazyKind.MKDIR:
                    walked.append(q)
                    self._process(Item(0, lazy=LazyKind.MKDIR, path=q))
                    for entry, _ in self._walk(q):
                        self._process(Item(0, lazy=LazyKind.CONTENT, path=entry))
                else:
                    lazy = LazyKind.ATTRS if kind == LazyKind.ATTRS else LazyKind.CONTENT
                    self._process(Item(0, lazy=lazy, path=q))
        for p, _ in hits:  # only now: a lost socket above retries the whole item
            self._vanished.discard(p)

    def _send_file(self, path: str, r: str, mode: str, lst: os.stat_result) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                self._note_vanished(path, LazyKind.CONTENT)
            elif exc.errno != errno.ELOOP:
                self.stats["read_failures"] += 1
                if mode != "realtime":
                    self.stats["mirror_failures"] += 1
            return
        try:
            mirror = mode != "realtime"
            if not mirror:
                self.stats["replication_ops"] += 1
            if (
                mode != "checksum"
                and lst.st_size <= self.small_file
                and lst.st_blocks * 512 >= lst.st_size  # not sparse (holes stay holes)
                and self._send_small(fd, lst, r, path, mirror)
            ):
                self.stats["files_sent"] += 1
                self._note_sent(path, lst.st_ino)
                return
            st = os.fstat(fd)
            blockwise = False
            old: list[int] | None = None
            if mode == "checksum" or (mode == "realtime" and st.st_size >= BIG_FILE):
                sig = self._sigs.get(path)
                if sig is not None and mode == "realtime":
                    old = sig[1]
                else:
                    chunks = self._request("hashes", path=r, block_size=BLOCK)
                    old = (
                        list(chunks[-1].get("hashes") or [])
                        if chunks and chunks[-1].get("exists")
                        else None
                    )
                blockwise = old is not None
            if blockwise and old is not None:
                self._send_blocks(fd, st, r, old, path, mirror)
            else:
                self._send_whole(fd, st, r, path, mirror)
            self.stats["files_sent"] += 1
            self._note_sent(path, st.st_ino)
        finally:
            os.close(fd)

    def _note_sent(self, path: str, ino: int) -> None:
        sent = self._sent_ino
        sent[path] = ino
        sent.move_to_end(path)
        if len(sent) > SENT_INO_MAX:
            sent.popitem(last=False)
        # Which name an inode was last sent under (_recheck_links; checked against
        # _sent_ino when read, rebuilt from it when it holds twice as many).
        self._sent_name[ino] = path
        if len(self._sent_name) > 2 * SENT_INO_MAX:
            self._sent_name = {i: p for p, i in sent.items()}
        if self._skipped_links:
            self._skipped_links.discard(path)

    def _send_relinked(self, path: str, r: str, mode: str, st: os.stat_result) -> bool:
        """An attribute change of a file skipped as hard-linked that has one link now:
        its content goes (changed while it was skipped, or never sent), with its
        attributes; True when it went that way (dtake.service.hardlinks)."""
        if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
            return False
        if self._skipped_links.ino_of(path) is None:
            return False
        self.stats["relinked_sent"] += 1
        self._send_file(path, r, mode, st)
        return True

    def _recheck_links(self, op: Op) -> None:
        """After a DELETE or RENAME while files skipped as hard-linked are remembered:
        the name it dropped (the DELETE's, or the one the RENAME replaced) may have been
        the second link of such a file, and nothing reports the name left (inotify tells
        a link count change only to a watch on the file). Its names with one link left,
        skipped or last sent, are sent now; a skipped name renamed is remembered under
        its new name (dtake.service.hardlinks)."""
        links = self._skipped_links
        base = self.base.rstrip("/")
        src = f"{base}/{op.path}"
        renamed = op.kind == OpKind.RENAME and bool(op.new_path)
        gone = f"{base}/{op.new_path}" if renamed else src
        ino = links.ino_of(gone)
        if ino is None:
            ino = self._sent_ino.get(gone)
        if ino is not None:
            names = links.names(ino)
            sent = self._sent_name.get(ino)
            if sent is not None and sent not in names and self._sent_ino.get(sent) == ino:
                names.append(sent)
            for p in names:
                if p in (gone, src):
                    continue
                try:
                    st = os.lstat(p)
                except OSError:
                    continue  # gone too: its own DELETE or RENAME follows
                single = st.st_ino == ino and st.st_nlink == 1 and stat.S_ISREG(st.st_mode)
                if single and self.rules.matches(p):
                    self.stats["relinked_sent"] += 1
                    self._process(Item(0, lazy=LazyKind.CONTENT, path=p))
        # Only now: a lost socket above processes the whole item again.
        links.discard(gone)
        if renamed and (moved := links.ino_of(src)) is not None:
            links.discard(src)
            links.add(gone, moved)

    def _recheck_rename(self, op: Op) -> None:
        """After a RENAME (or DELETE) of a file this connection sent recently: when the
        file now at the new name is not the one sent under the old name, send it.

        Log rotation racing the sender (``mv log log.1; create log`` before the sender
        read a change of ``log``, or before the capture even reported it): the sender
        read the *new* ``log`` and sent it under that name; the RENAME then moves that
        content to ``log.1`` on the target, while the source's ``log.1`` is the old
        file, which never went. Nothing would ever correct it. The inode the sender read
        under ``log`` tells: ``log.1`` is another inode now, so it is sent (the new
        ``log`` follows with its own event). The RENAME is processed after the send it
        corrects (the change was queued before the rename event), in this thread.
        Directories renamed over what was sent below them are not covered."""
        base = self.base.rstrip("/")
        src = f"{base}/{op.path}"
        ino = self._sent_ino.get(src)
        if ino is None or op.kind != OpKind.RENAME or not op.new_path:
            self._sent_ino.pop(src, None)
            return
        dst = f"{base}/{op.new_path}"
        try:
            st = os.lstat(dst)
        except OSError:
            st = None  # gone again: a later RENAME or DELETE tells the target
        if st is not None and stat.S_ISREG(st.st_mode):
            if st.st_ino == ino:
                self._note_sent(dst, ino)  # the file sent, under its new name
            elif self.rules.matches(dst):
                self.stats["replaced_resent"] += 1
                self._process(Item(0, lazy=LazyKind.CONTENT, path=dst))
        # Only now: a lost socket above processes the whole item again (the RENAME
        # again, a no-op on the target, then this check).
        self._sent_ino.pop(src, None)

    def _remember_sig(self, path: str, size: int, hashes: list[int] | None) -> None:
        old = self._sigs.pop(path, None)
        if old is not None:
            self._sig_blocks -= len(old[1])
        if hashes is not None and self._sig_blocks + len(hashes) <= SIG_CACHE_MAX_BLOCKS:
            self._sigs[path] = (size, hashes)
            self._sig_blocks += len(hashes)

    def _data_extents(self, fd: int, size: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of data regions; holes are skipped so sparse files stay sparse."""
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                yield pos, size - pos
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            end = min(end, size)
            if end > start:
                yield start, end - start
            pos = end

    def _send_small(self, fd: int, lst: os.stat_result, r: str, path: str, mirror: bool) -> bool:
        """A small file as one op: data, size and attributes (FILE_END tagged ``whole``).
        False when the file is not the one ``lst`` described or changed meanwhile (the
        general path then sends it)."""
        data = os.pread(fd, lst.st_size + 1, 0) if lst.st_size else b""
        st = os.fstat(fd)
        if st.st_ino != lst.st_ino or st.st_size != len(data) or not stat.S_ISREG(st.st_mode):
            return False
        op = _attr_op(OpKind.FILE_END, r, st, size=st.st_size)
        op.data = data
        op.tags["whole"] = 1
        self._emit(op)
        if mirror:
            self.mirror_sent += len(data)
            self.stats["mirror_bytes_sent"] += len(data)
        if path in self._sigs:
            self._remember_sig(path, st.st_size, None)
        return True

    def _send_whole(self, fd: int, st: os.stat_result, r: str, path: str, mirror: bool) -> None:
        size = st.st_size
        track = size >= BIG_FILE
        hashes: list[int] | None = [] if track else None
        # Without holes, the size lets the target allocate the file's blocks up front.
        dense = size >= BIG_FILE and st.st_blocks * 512 >= size
        self._emit(Op(OpKind.FILE_BEGIN, r, size=size if dense else None))
        hpos = 0  # the signature is computed from the chunks as they are read
        for off, length in self._data_extents(fd, size):
            end = off + length
            while off < end:
                n = min(self.chunk, end - off)
                data = os.pread(fd, n, off)
                if not data:
                    break
                if hashes is not None and off == hpos:
                    mv = memoryview(data)
                    full = len(data) - len(data) % BLOCK
                    if off + len(data) >= size:
                        full = len(data)  # the last block may be short
                    for i in range(0, full, BLOCK):
                        hashes.append(xxhash.xxh3_64_intdigest(mv[i : i + BLOCK]))
                    hpos += full
                self._emit(Op(OpKind.WRITE, r, offset=off, data=data))
                if mirror:
                    self.mirror_sent += len(data)
                    self.stats["mirror_bytes_sent"] += len(data)
                off += len(data)
        if hashes is not None:
            # Signature for later block-wise real-time sends (read from the page cache).
            while hpos < size:
                hashes.append(xxhash.xxh3_64_intdigest(os.pread(fd, BLOCK, hpos)))
                hpos += BLOCK
        st2 = os.fstat(fd)
        self._emit(_attr_op(OpKind.FILE_END, r, st2, size=st2.st_size))
        self._remember_sig(path, st2.st_size, hashes if st2.st_size == size else None)

    def _send_blocks(
        self, fd: int, st: os.stat_result, r: str, old: list[int], path: str, mirror: bool
    ) -> None:
        size = st.st_size
        hashes: list[int] = []
        pos = 0
        i = 0
        data_start = data_end = 0  # the source's current data extent (holes are skipped)
        while pos < size:
            if pos >= data_end:
                data_start, data_end = _next_extent(fd, pos, size)
            n = min(BLOCK, size - pos)
            if pos + n <= data_start:
                # Entirely in a hole: not read, and not sent where the target has no
                # data (beyond its end) or zeros already; SETSIZE keeps the hole.
                h = _ZERO_BLOCK_HASH if n == BLOCK else xxhash.xxh3_64_intdigest(bytes(n))
                hashes.append(h)
                if i >= len(old) or (old[i] == h and n == BLOCK):
                    self.stats["blocks_skipped"] += 1
                else:
                    self._emit(Op(OpKind.WRITE, r, offset=pos, data=bytes(n)))
                pos += n
                i += 1
                continue
            data = os.pread(fd, BLOCK, pos)
            if not data:
                break
            h = xxhash.xxh3_64_intdigest(data)
            hashes.append(h)
            if i < len(old) and old[i] == h and len(data) == BLOCK:
                self.stats["blocks_skipped"] += 1
            else:
                self._emit(Op(OpKind.WRITE, r, offset=pos, data=data))
                if mirror:
                    self.mirror_sent += len(data)
            pos += len(data)
            i += 1
        st2 = os.fstat(fd)
        self._emit(_attr_op(OpKind.SETSIZE, r, st2, size=pos))
        self._remember_sig(path, pos, hashes)

    # ------------------------------------------------------------------ sending
    def _emit(self, op: Op) -> None:
        if self._inflight_bytes > self.window_bytes and self._batch:
            self._flush_batch()  # the window is full: what it holds must be on the wire
        with self._ack_cond:
            while (
                self._inflight_bytes > self.window_bytes
                and self._fs is not None
                and not self._stop.is_set()
            ):
                self._ack_cond.wait(0.5)
            if self._fs is None:
                raise _Gap()
            op.seq = self.next_seq
            span = op.span()  # a FILES op: one per file
            self.next_seq += span
            if self._item_order and self.queue.journal is not None:
                # First op of a queue item: the target records how far the queue got,
                # so a restart replays from there (dtake.service.queue).
                op.tags["qo"] = self._item_order
                self._sent_notes.append((op.seq, self._item_order))  # noted at the flush
            self._item_order = 0
            cost = op_cost(op)
            self._inflight.append((self.next_seq - 1, op))
            self._inflight_bytes += cost
            self.queue.inflight_bytes = self._inflight_bytes
            self.queue.note_peak()
            self._batch.append(op)
            self._batch_bytes += cost
        self.stats["ops_sent"] += span
        self.stats["bytes_sent"] += len(op.data)
        if op.path or op.kind != OpKind.BARRIER:
            self.stats["last_file_touched"] = op.new_path or op.path
        if self._batch_bytes >= self.batch_bytes or len(self._batch) >= BATCH_OPS:
            self._flush_batch()

    def _flush_batch(self) -> None:
        from dtake.protocol.framing import MsgType
        from dtake.protocol.opwire import encode_ops

        with self._send_lock:
            with self._lock:
                batch, self._batch = self._batch, []
                notes, self._sent_notes = self._sent_notes, []
                self._unasked += self._batch_bytes
                self._batch_bytes = 0
                fs = self._fs
                if batch and fs is not None and self._unasked >= self.window_bytes // 4:
                    # Early acknowledgement: a quarter of the window went out since the
                    # last ask, so the target acknowledges right after applying this
                    # frame instead of at its cumulative cadence (the window must reopen
                    # before it is full, or sending stalls until the target drains).
                    self._unasked = 0
                    last = batch[-1]
                    if not last.tags:  # op_cost grows by the tags; keep the books exact
                        self._inflight_bytes += TAGS_OVERHEAD
                        self.queue.inflight_bytes = self._inflight_bytes
                    last.tags[ACK_TAG] = 1
            self.queue.note_sent(notes)  # before an acknowledgement can refer to them
            if batch and fs is not None:
                parts = encode_ops(batch)
                # Bandwidth limit: the frame pays before it leaves (after_send corrects
                # the charge to the compressed size).
                self.tx.before_send(sum(map(len, parts)))  # bytes, byte views
                wire = fs.send_parts(MsgType.OPS_DATA, parts, compress=self._codec)
                self.tx.after_send(fs, wire)  # byte counters, bandwidth limit

    # ------------------------------------------------------------------ status
    def idle(self) -> bool:
        with self._lock:
            return (
                self._fs is not None
                and self.mirror_status == "Idle"
                and len(self.queue) == 0
                and not self._holding
                and not self._inflight
                and not self._batch
                and self.rec.target_data_state == "OK"
            )

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        stable = 0
        while time.monotonic() < deadline:
            if self.idle():
                stable += 1
                if stable >= 3:  # idle across a few capture read cycles
                    return True
            else:
                stable = 0
            time.sleep(0.05)
        return False

    def transmit_state(self) -> str:
        if self.rec.transmit in ("Stopped", "Paused"):
            return self.rec.transmit
        if self._fs is None:
            return "Error" if self.last_error else "Stopped"
        return "Started"

    def status(self) -> dict[str, Any]:
        mirror = self.mirror_status
        if mirror == "Mirroring" and self.mirror_queued_done and self.mirror_total:
            mirror = f"{min(99, int(100 * self.mirror_sent / max(1, self.mirror_total)))}%"
        queued = len(self.queue) + self._holding
        if self.replication == "Stopped":
            repl = "Stopped"
        elif self.replication == "Pending":
            repl = "Pending"
        elif queued or self._inflight:
            repl = "Replicating"
        else:
            repl = "Ready"
        return self.tx.decorate(
            {
                "id": self.rec.id,
                "uuid": self.rec.uuid,
                "repset": self.rec.repset,
                "target": self.label,
                "target_path": self.rec.target_path,
                "state": self.transmit_state(),
                "mirror_status": mirror,
                "mirror_mode": self.mirror_mode_running,
                "replication_status": repl,
                "target_data_state": self.rec.target_data_state,
                "connected_since": self.connected_since,
                "queued_items": queued,
                "queued_bytes": self.queue.bytes,
                "unacked_ops": len(self._inflight),
                "next_seq": self.next_seq,
                "acked_seq": self.acked_seq,
                "last_error": self.last_error,
                "orphans": self.rec.orphans,
                "compression": self.rec.compression,
                "resync": self.resync.status(),  # how the last mirror resynced
                "stats": dict(self.stats),
            }
        )


_ZERO_BLOCK_HASH = xxhash.xxh3_64_intdigest(bytes(BLOCK))


def _next_extent(fd: int, pos: int, size: int) -> tuple[int, int]:
    """(start, end) of the first data extent at or after ``pos``; (size, size) if none.
    Without SEEK_DATA support everything is data."""
    try:
        start = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size, size
        return pos, size
    return start, max(start + 1, min(os.lseek(fd, start, os.SEEK_HOLE), size))


def _attr_op(kind: OpKind, rel: str, st: os.stat_result, **kw: Any) -> Op:
    """An op carrying the file's attributes, so the target ends with the source's mode,
    owner and mtime (mtime last, after any data)."""
    return Op(
        kind,
        rel,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        **kw,
    )

"""Change journal: a differences resync after a clean disconnect without the tree walks.

DRBD resyncs a peer that was disconnected cleanly from its out-of-sync bitmap instead of
comparing the whole device. dtake does the same with files:

- **Source.** When ``dtake disconnect`` removes a connection that is in sync at that
  moment (mirror complete, data state OK, nothing queued or unacknowledged, no gap
  pending), the service keeps a :class:`ChangeJournal` for (replication set, host, port,
  target path): the paths the capture reports changed from then on. The capture keeps
  watching the set's roots after its connections go, so nothing is needed but marking.
- **Target.** The target answers that ``close`` with a *detach token* when its own side
  is clean, and from then on watches the target root with inotify
  (:class:`TargetWatch`): any change below it, or a queue overflow, spoils the token.
- **Resync.** A new connection with the same key and ``--mirror differences`` presents
  the token at ``open``; when the target confirms it, the mirror queues only the
  journal's paths (then the usual MIRROR_END), instead of walking the source and
  scanning the target. In every other case the mirror walks as before.

Everything is in memory: a restart of either service forgets journals and tokens, and
the next resync walks. Whenever the journal could be incomplete (inotify overflow, a
capture failure, a rule change, more paths than ``journal_max_paths``) it is dropped.
docs/resync-journal.md is the operator's view.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtake.service.events import EVENTS
from dtake.service.snapshot import _unescape

if TYPE_CHECKING:
    from dtake.rules import RuleSet
    from dtake.service.daemon import Service
    from dtake.service.source import Connection
    from dtake.service.target import TargetState

__all__ = [
    "ATTRS",
    "DIR",
    "ENTRY",
    "PARENT",
    "SUBTREE",
    "ChangeJournal",
    "Journals",
    "ResyncState",
    "TargetWatch",
    "journal_resync",
]

log = logging.getLogger("dtake.journal")

# Marks (bit flags per absolute source path).
ENTRY = 1  # created, written, deleted, renamed: send what is there now, or delete it
SUBTREE = 2  # a directory created or moved in: everything below it too
ATTRS = 4  # only attributes changed (chmod, chown, touch): an ATTRS op
PARENT = 8  # a directory whose entries changed: its attributes again at the end
DIR = 16  # the path was a directory when marked

DEFAULT_MAX_PATHS = 100_000
MAX_TOKENS = 16  # detach tokens kept by a target (one inotify instance each)
ARM_WAIT_S = 20.0  # an open waits this long for the watches (the source waits 30 s)
CLOCK_REALTIME_COARSE = 5  # linux/time.h (not in Python's time module): stamps ctimes

EVENTS.update(
    {
        51010: (
            "info",
            "Change journal kept for Replication Set {repset} to {target}:{target_path} "
            "(connection {con_id} disconnected in sync): a differences resync replays it",
        ),
        51011: (
            "info",
            "No change journal for Replication Set {repset} to {target}:{target_path}: {reason}",
        ),
        51012: (
            "info",
            "Connection {con_id}: differences mirror resynced from the change journal "
            "({paths} changed paths), no tree walk",
        ),
        51013: (
            "info",
            "Connection {con_id}: change journal not used ({reason}); the mirror walks the tree",
        ),
    }
)

JournalKey = tuple[str, str, int, str]


def journal_key(conn: Connection) -> JournalKey:
    r = conn.rec
    return (r.repset, r.host, int(r.port), os.path.normpath(r.target_path))


def _parent(path: str) -> str:
    return path.rpartition("/")[0] or "/"


def mounts_near(paths: Iterable[str], *, table: str = "/proc/self/mountinfo") -> frozenset[str]:
    """Mounts (id and mount point) at, below or above any of ``paths``. Mounting or
    unmounting there changes what a path shows without any inotify event, so a journal
    or token whose set of such mounts changed is not trusted."""
    tops = [os.path.normpath(p) for p in paths]
    out: set[str] = set()
    try:
        with open(table, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return frozenset({"?"})  # unknown: compares equal only to another unknown
    for line in lines:
        f = line.split(" ", 5)
        if len(f) < 5:
            continue
        mp = _unescape(f[4])
        for t in tops:
            if mp == t or mp == "/" or t.startswith(mp + "/") or mp.startswith(t + "/"):
                out.add(f"{f[0]} {mp}")
                break
    return frozenset(out)


# ---------------------------------------------------------------------------- source
class ChangeJournal:
    """Paths of one replication set changed since a clean disconnect from one target.

    Marking follows the capture's events (after its rule filter), so a journal replayed
    in parent-before-child order reaches what real-time replication would have sent:

    ==============================  ==================================================
    event                           marks
    ==============================  ==================================================
    created, written, symlink       the path (ENTRY), its parent (PARENT)
    mkdir                           the directory and its subtree (ENTRY|SUBTREE)
    deleted                         the path (ENTRY: replayed as a DELETE), its parent
    renamed                         both paths (the new one with its subtree), parents
    attributes only                 the path (ATTRS); the parent's mtime did not move
    ==============================  ==================================================

    Memory: one dict entry per marked path, about 90 bytes plus the path's length
    (measured: 128 bytes per path of 40 characters, 13 MB at the default bound of
    100,000 paths).
    """

    def __init__(self, key: JournalKey, rules: RuleSet, *, max_paths: int) -> None:
        self.key = key
        self.rules = rules
        self.base = rules.base()
        self.roots = frozenset(rules.watch_roots())
        self.mounts = mounts_near(self.roots)
        self.max_paths = max_paths
        self._prefix = self.base.rstrip("/") + "/"
        self.marks: dict[str, int] = {}
        self.token = ""  # the target's detach token (set once the disconnect is clean)
        self.invalid = ""  # why this journal cannot be used ("" = usable)
        self.since = time.time()

    def __len__(self) -> int:
        return len(self.marks)

    def invalidate(self, why: str) -> None:
        if not self.invalid:
            self.invalid = why
            log.info("change journal %s invalidated: %s", self.key, why)
        self.marks = {}

    def _under_base(self, path: str) -> bool:
        return path == self.base or path.startswith(self._prefix)

    def mark(self, path: str, flags: int) -> None:
        if self.invalid or not self._under_base(path):
            return
        marks = self.marks
        old = marks.get(path)
        if old is None:
            if len(marks) >= self.max_paths:
                self.invalidate(f"more than {self.max_paths} changed paths (journal_max_paths)")
                return
            marks[path] = flags
        elif old | flags != old:
            marks[path] = old | flags
        if flags & (ENTRY | SUBTREE) and path != self.base:
            # Creating, deleting or renaming an entry moves its directory's mtime.
            self.mark(_parent(path), PARENT | DIR)

    def mark_event(
        self, kind: str, path: str, *, is_dir: bool = False, dest: str | None = None
    ) -> None:
        """One capture event (the capture loop's kinds, after its temp-file handling)."""
        if self.invalid:
            return
        if kind in ("deleted", "moved") and path in self.roots:
            # The capture stops watching a root that goes: a new one would be unseen.
            self.invalidate(f"{path}, a watched root of the set, was deleted or moved")
            return
        d = DIR if is_dir else 0
        matches = self.rules.matches
        if kind == "moved" and dest is not None:
            if matches(path, is_dir=is_dir):
                self.mark(path, ENTRY | d)
            if matches(dest, is_dir=is_dir):
                self.mark(dest, ENTRY | d | (SUBTREE if is_dir else 0))
            return
        if not matches(path, is_dir=is_dir or kind == "mkdir"):
            return
        if kind == "mkdir":
            self.mark(path, ENTRY | SUBTREE | DIR)
        elif kind == "attrib":
            self.mark(path, ATTRS | d)
        elif kind in ("created", "symlink", "modified", "closed_write", "deleted"):
            self.mark(path, ENTRY | d | (SUBTREE if is_dir and kind == "created" else 0))
        else:
            self.invalidate(f"unknown capture event {kind!r}")


@dataclass
class ResyncState:
    """Per connection: the detach token presented at its first ``open``, the target's
    verdict, and how its last mirror resynced (shown by ``dtake status``)."""

    token: str = ""  # presented at open ("" = none)
    opened: bool = False  # the first open was answered (only it presents a token)
    verdict: bool | None = None  # the target's answer (None: no answer yet / none asked)
    verdict_reason: str = ""
    decided: bool = False  # the first mirror has chosen journal or walk
    replaying: Any = None  # the cancel event of the mirror replaying ``marks``
    walking: Any = None  # the cancel event of the mirror that decided to walk
    marks: dict[str, int] = field(default_factory=dict)
    shown: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any] | None:
        return dict(self.shown) if self.shown else None


class Journals:
    """The service's journals (source side) and detach tokens (target side)."""

    def __init__(self, svc: Service, *, max_paths: int = DEFAULT_MAX_PATHS) -> None:
        self.svc = svc
        self.max_paths = max_paths
        # Held by the capture loop while it dispatches one batch of events, and here
        # while a journal is installed or taken: a batch goes either to the connection
        # or to the journal, never to neither. Lock order: this, then the service lock.
        self.dispatch_lock = threading.RLock()
        self._journals: dict[JournalKey, ChangeJournal] = {}
        self._dropped: dict[JournalKey, str] = {}  # why the last journal of a key went
        self.tokens = TargetTokens()

    # -- capture side (called with dispatch_lock held) ------------------------------------
    def active(self) -> list[ChangeJournal]:
        return [j for j in self._journals.values() if not j.invalid]

    def invalidate_all(self, why: str) -> None:
        for j in list(self._journals.values()):
            j.invalidate(why)

    def invalidate_repset(self, repset: str, why: str) -> None:
        for j in list(self._journals.values()):
            if j.key[0] == repset:
                j.invalidate(why)

    # -- disconnect -------------------------------------------------------------------------
    def install(self, conn: Connection) -> ChangeJournal | None:
        """Called with dispatch_lock and the service lock held, as the connection leaves
        the service's list: from now on the capture marks this journal instead."""
        if self.max_paths <= 0:
            return None
        key = journal_key(conn)
        j = ChangeJournal(key, conn.rules, max_paths=self.max_paths)
        self._journals[key] = j  # a newer disconnect replaces an older journal
        self._dropped.pop(key, None)
        capture = self.svc.capture
        watched = capture.roots if capture is not None else frozenset()
        for root in conn.rules.watch_roots():
            if not any(root == w or root.startswith(w.rstrip("/") + "/") for w in watched):
                j.invalidate(f"{root} is not watched (it did not exist when connected)")
        return j

    def settle(self, j: ChangeJournal | None, conn: Connection, answer: dict[str, Any]) -> None:
        """After the ``close`` and the connection's stop: keep the journal only if both
        sides were in sync when the journal started."""
        if j is None:
            return
        why = in_sync(conn)
        token = str(answer.get("detach_token") or "")
        if not why and not token:
            why = str(
                answer.get("detach_token_refused")
                or (
                    "the target gave no detach token (it did not answer the close, "
                    "or its build has no journal support)"
                )
            )
        if not why and j.invalid:
            why = j.invalid
        ev = {
            "repset": conn.rec.repset,
            "target": conn.label,
            "target_path": conn.rec.target_path,
            "con_id": conn.rec.id,
        }
        if why:
            self.drop(j, why)
            self.svc.events.emit(51011, reason=why, **ev)
            return
        j.token = token
        self.svc.events.emit(51010, **ev)

    def drop(self, j: ChangeJournal, why: str) -> None:
        j.invalidate(why)
        with self.dispatch_lock:
            if self._journals.get(j.key) is j:
                del self._journals[j.key]
                self._dropped[j.key] = why

    # -- new connection ---------------------------------------------------------------------
    def open_fields(self, conn: Connection) -> dict[str, Any]:
        """``detach_token`` for the first ``open`` of a new connection that will run a
        differences mirror and has a journal (absent: no journal, an older peer ignores
        the field)."""
        rs = conn.resync
        if rs.opened:
            return {}
        if conn.rec.mirror != "differences" or conn.rec.orphans != "off":
            return {}
        j = self._journals.get(journal_key(conn))
        if j is None or j.invalid or not j.token:
            return {}
        rs.token = j.token
        return {"detach_token": j.token}

    @staticmethod
    def on_open_response(conn: Connection, resp: dict[str, Any]) -> None:
        rs = conn.resync
        rs.opened = True
        if rs.token and rs.verdict is None:
            rs.verdict = bool(resp.get("detach_token_valid"))
            rs.verdict_reason = str(
                resp.get("detach_token_reason")
                or ("" if rs.verdict else "the target did not confirm the detach token")
            )

    def take(self, key: JournalKey, token: str) -> tuple[ChangeJournal | None, str]:
        """Remove and return the journal for ``key`` (None and why when unusable)."""
        with self.dispatch_lock:
            j = self._journals.get(key)
            if j is None:
                return None, self._dropped.get(key, "the journal is gone")
            if j.token != token:
                return None, "a newer disconnect replaced the journal"
            del self._journals[key]
            if not j.invalid and mounts_near(j.roots) != j.mounts:
                j.invalidate("a file system was mounted or unmounted at or near the set's roots")
            if j.invalid:
                self._dropped[key] = j.invalid
                return None, j.invalid
            return j, ""

    def forget(self, key: JournalKey, why: str) -> None:
        with self.dispatch_lock:
            j = self._journals.pop(key, None)
            if j is not None:
                j.invalidate(why)
                self._dropped[key] = j.invalid

    def why_none(self, conn: Connection) -> str:
        key = journal_key(conn)
        if key in self._dropped:
            return self._dropped[key]
        j = self._journals.get(key)
        if j is not None and j.invalid:
            return j.invalid
        return "no clean disconnect of this replication set from this target path recorded"

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "repset": k[0],
                "target": f"{k[1]}:{k[2]}",
                "target_path": k[3],
                "paths": len(j),
                "valid": not j.invalid and bool(j.token),
                "reason": j.invalid,
                "since": j.since,
            }
            for k, j in list(self._journals.items())
        ]


def in_sync(conn: Connection) -> str:
    """Why a stopped connection was not in sync ("" when it was)."""
    if conn._worker.is_alive():
        return "the connection's worker did not stop"
    if conn.mirror_status != "Idle" or (
        conn._mirror_thread is not None and conn._mirror_thread.is_alive()
    ):
        return "a mirror was running"
    if conn.rec.target_data_state != "OK":
        return f"the target data state was {conn.rec.target_data_state}"
    n = len(conn.queue)
    if n or conn.queue.overflowed:
        return f"{n} items were still queued"
    if conn._inflight or conn._batch:
        return f"{len(conn._inflight) + len(conn._batch)} ops were not acknowledged"
    if conn.replication != "Replicating" or conn._needs_resync or not conn.tx.accepting():
        return "a resync was owed (gap, paused or stopped replication)"
    if conn.rec.transmit != "Started":
        return f"transmission was {conn.rec.transmit}"
    return ""


# ---------------------------------------------------------------------------- resync
def journal_resync(conn: Connection, mode: str, cancel: threading.Event) -> bool:
    """At the start of a mirror: replay the change journal instead of walking, when it
    may be used. True: the mirror's items are queued (or it was cancelled); False:
    walk (the reason is in ``conn.resync.shown`` and event 51013)."""
    rs = conn.resync
    if rs.replaying is cancel:  # the same mirror again after a lost connection
        replay(conn, rs.marks, mode, cancel)
        return True
    if rs.walking is cancel:
        return False  # the same walked mirror again: the reason shown stays
    first = not rs.decided
    rs.decided = True
    why = ""
    if not first:
        why = "the journal serves only the first mirror of a new connection"
    elif mode != "differences":
        why = f"mirror mode {mode}"
    elif conn.rec.orphans != "off":
        why = "orphan handling needs the full scan of the target"
    else:
        # The first open (which presents the token) has been answered once connected.
        if not conn._wait_connected(cancel):
            return True  # cancelled before the target answered
        if not rs.token:
            why = conn.svc.journals.why_none(conn)
        elif not rs.verdict:
            why = f"the target refused the detach token: {rs.verdict_reason}"
    j: ChangeJournal | None = None
    if not why:
        j, why = conn.svc.journals.take(journal_key(conn), rs.token)
    if j is None:
        rs.walking = cancel
        rs.shown = {"method": "walk", "reason": why}
        if first:
            # This connection's first mirror walks: a journal kept for its key has no
            # use any more (its token is spent or the target is being written to).
            conn.svc.journals.forget(journal_key(conn), why)
            if mode == "differences":
                conn.svc.events.emit(51013, con_id=conn.rec.id, reason=why)
        return False
    rs.marks = j.marks
    rs.replaying = cancel
    rs.shown = {"method": "journal", "paths": len(j.marks), "reason": ""}
    conn.svc.events.emit(51012, con_id=conn.rec.id, paths=len(j.marks))
    replay(conn, rs.marks, mode, cancel)
    return True


def _order(path: str) -> list[str]:
    return path.split("/")  # component-wise: a directory sorts before its entries


def replay(conn: Connection, marks: dict[str, int], mode: str, cancel: threading.Event) -> None:
    """Queue the journal's paths as the walked mirror would queue them, then MIRROR_END.
    A paused mirror queues nothing more until it is resumed, as the walk
    (``Connection._mirror_hold``, checked before each path, directory and attribute op)."""
    from dtake.ops import Op, OpKind
    from dtake.service.queue import LazyKind
    from dtake.service.source import BIG_FILE, _Gap

    q, rules, base = conn.queue, conn.rules, conn.base
    stopped = conn._stop

    def halt() -> bool:
        return cancel.is_set() or stopped.is_set()

    def put(kind: str, path: str, *, m: str = "full", ino: int | None = None) -> None:
        q.wait_room(halt)  # flow control, as the walk
        if not q.put_lazy(kind, path, mode=m, ino=ino):
            raise _Gap()

    gone: set[str] = set()  # missing or no longer directories: what was below them is covered
    walked: set[str] = set()  # directories whose whole subtree was queued
    # Directories whose attributes go again at the end; the base always, as the walk
    # always sends it (with several roots the base itself is not watched).
    attrs: set[str] = {base} if os.path.isdir(base) else set()
    total = 0
    hold = conn._mirror_hold
    for path in sorted(marks, key=_order):
        hold(cancel)
        if halt():
            return
        flags = marks[path]
        a = _parent(path) if path != base else ""
        covered = False
        while a and len(a) >= len(base):
            if a in gone or a in walked:
                covered = True
                break
            if a == base:
                break
            a = _parent(a)
        if covered:
            continue
        r = conn.rel(path)
        if r is None:
            continue
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError:
            gone.add(path)  # unreadable: the walk skips such entries too
            continue
        if st is None:
            gone.add(path)
            if r and rules.matches(path, is_dir=bool(flags & DIR)):
                q.wait_room(halt)
                if not q.put_delete(path, Op(OpKind.DELETE, r)):
                    raise _Gap()
            continue
        fmt = stat.S_IFMT(st.st_mode)
        if fmt != stat.S_IFDIR:
            gone.add(path)
        if is_temp(path) or not rules.matches(path, is_dir=fmt == stat.S_IFDIR):
            continue
        if fmt == stat.S_IFDIR:
            if conn.svc.is_internal(path):
                gone.add(path)
                continue
            attrs.add(path)
            if flags & (ENTRY | SUBTREE):
                put(LazyKind.MKDIR, path)
            if flags & SUBTREE:
                walked.add(path)
                for chunk in conn._walk_dirs(path):
                    hold(cancel)
                    if halt():
                        return
                    attrs.update(p for p, est in chunk if stat.S_ISDIR(est.st_mode))
                    # As the walk queues them; a large file block by block (as below).
                    done = conn._queue_walked(chunk, mode, total, cancel, big_mode="checksum")
                    if done is None:
                        return
                    total = done[0]
        elif fmt == stat.S_IFLNK:
            put(LazyKind.SYMLINK, path)
        elif fmt == stat.S_IFREG:
            if st.st_nlink > 1:
                conn._warn_hardlink(path, st)
            elif flags & ENTRY:
                # Large files go block by block against the target's copy.
                put(
                    LazyKind.CONTENT,
                    path,
                    m="checksum" if st.st_size >= BIG_FILE else mode,
                    ino=st.st_ino,
                )
                total += st.st_size
            else:
                put(LazyKind.ATTRS, path)
        conn.mirror_total = total
    for d in sorted(attrs, key=lambda p: -p.count("/")):  # deepest first, as the walk
        hold(cancel)
        if halt():
            return
        put(LazyKind.ATTRS, d)
    if not halt():
        conn.mirror_queued_done = True
        q.put_marker(LazyKind.MIRROR_END, mode=mode)
        rs = conn.resync
        if rs.replaying is cancel:
            rs.marks = {}  # queued: a lost connection now resends from the queue
            rs.replaying = None


def is_temp(path: str) -> bool:
    from dtake.service.apply import TEMP_MARK, is_temp_name

    name = path.rpartition("/")[2]
    return TEMP_MARK in name and is_temp_name(name)


# ---------------------------------------------------------------------------- target
def ctime_floor() -> int:
    """A time no earlier change has reached as a ctime and every later change reaches.

    Earlier changes: their ctime is at most the real time they were made (coarse clock,
    or a fine-grained stamp with multigrain timestamps, Linux 6.13+), so below ``t0``
    read now. Later changes: at least the coarse clock at that moment (a multigrain
    ctime is never below it), so at least its first value past ``t0`` (a tick: 1-10 ms).
    """
    t0 = time.time_ns()
    while (t1 := time.clock_gettime_ns(CLOCK_REALTIME_COARSE)) <= t0:
        time.sleep(0.001)
    return t1


class TargetWatch:
    """One detach token: inotify on every directory of a target root.

    Armed in a background thread after the ``close`` answer: watches are added top
    down, and every entry's ctime is checked against a point in time taken before the
    answer was sent (``ctime_floor``, in ``__init__``), so a change made while the watches were still being
    added is caught too. Nothing reads the events:
    at ``check`` any queued event (or an overflow) means the tree changed.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.token = secrets.token_hex(16)
        self.failed = ""
        self.mounts = mounts_near([root])
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the root
        self._ino: Any = None
        self._armed = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        # Taken here, before the ``close`` answer leaves: a change made after the answer
        # has a ctime at or above it, however late the arming thread runs.
        self._floor = ctime_floor()
        self._thread = threading.Thread(target=self._arm, name="detach-watch", daemon=True)
        self._thread.start()

    def _arm(self) -> None:
        try:
            self._arm_inner()
        except Exception as exc:  # a token that cannot be armed is refused later
            self.failed = self.failed or f"cannot watch {self.root}: {exc}"
        finally:
            self._armed.set()

    def _arm_inner(self) -> None:
        import inotify_simple

        from dtake.capture.inotify import WATCH_MASK

        t1 = self._floor
        ino = inotify_simple.INotify(nonblocking=True)
        with self._lock:
            if self._closed:
                ino.close()
                return
            self._ino = ino
        try:
            st = os.lstat(self.root)
        except OSError as exc:
            self.failed = f"target root {self.root}: {exc.strerror}"
            return
        if not stat.S_ISDIR(st.st_mode):
            self.failed = f"target root {self.root} is not a directory"
            return
        self._ident = (st.st_dev, st.st_ino)
        stack = [self.root]
        while stack:
            d = stack.pop()
            if self._closed:
                return
            try:
                ino.add_watch(d, WATCH_MASK)
                dst = os.lstat(d)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self.failed = "fs.inotify.max_user_watches reached"
                else:
                    self.failed = f"cannot watch {d}: {exc.strerror}"
                return
            if dst.st_ctime_ns >= t1:
                self.failed = f"{d} changed after the close"
                return
            try:
                with os.scandir(d) as it:
                    for e in it:
                        est = e.stat(follow_symlinks=False)
                        if est.st_ctime_ns >= t1:
                            self.failed = f"{e.path} changed after the close"
                            return
                        if stat.S_ISDIR(est.st_mode):
                            stack.append(e.path)
            except OSError as exc:
                self.failed = f"cannot list {d}: {exc.strerror}"
                return

    def changed(self, *, wait_s: float = ARM_WAIT_S) -> str:
        """Why the tree may have changed since the token was made ("" = unchanged)."""
        if not self._armed.wait(wait_s):
            return "the target's watches were not in place in time"
        if self.failed:
            return self.failed
        try:
            st = os.lstat(self.root)
            same = (st.st_dev, st.st_ino) == self._ident
        except OSError:
            same = False
        if not same:
            return f"{self.root} is no longer the directory the token was made for"
        if mounts_near([self.root]) != self.mounts:
            return f"a file system was mounted or unmounted at or near {self.root}"
        ino = self._ino
        if ino is None:
            return "the token was withdrawn"
        try:
            events = ino.read(timeout=0)
        except OSError as exc:
            return f"reading the target's watch failed: {exc}"
        if events:
            ev = events[0]
            if ev.mask & 0x4000:  # IN_Q_OVERFLOW
                return "the target's watch overflowed"
            return f"the target tree changed ({len(events)}+ events, e.g. {ev.name or '.'})"
        return ""

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ino, self._ino = self._ino, None
        if ino is not None:
            try:
                ino.close()
            except OSError:
                pass


class TargetTokens:
    """Detach tokens of this service's target roots (in memory: a restart forgets them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_root: dict[str, TargetWatch] = {}

    def issue(self, root: str) -> str:
        root = os.path.normpath(root)
        w = TargetWatch(root)
        with self._lock:
            old = self._by_root.pop(root, None)
            self._by_root[root] = w
            while len(self._by_root) > MAX_TOKENS:
                oldest = next(iter(self._by_root))
                self._by_root.pop(oldest).close()
        if old is not None:
            old.close()
        return w.token

    def check(self, root: str, token: str) -> tuple[bool, str]:
        """Is ``token`` the live token of ``root`` and the tree unchanged? Consumes it."""
        root = os.path.normpath(root)
        with self._lock:
            w = self._by_root.get(root)
            if w is None or w.token != token:
                why = (
                    "the target has no detach token for this path (restarted, or replaced)"
                    if w is None
                    else "the target holds a newer detach token for this path"
                )
                return False, why
            del self._by_root[root]
        try:
            why = w.changed()
        finally:
            w.close()
        return (not why), why

    def withdraw(self, root: str) -> None:
        with self._lock:
            w = self._by_root.pop(os.path.normpath(root), None)
        if w is not None:
            w.close()

    def close(self) -> None:
        with self._lock:
            ws, self._by_root = list(self._by_root.values()), {}
        for w in ws:
            w.close()

    def __len__(self) -> int:
        return len(self._by_root)


def issue_token(svc: Service, st: TargetState, req: dict[str, Any]) -> dict[str, Any]:
    """The ``close`` answer's token fields: ``detach_token`` when asked for and this
    side is clean, else ``detach_token_refused`` (nothing when not asked)."""
    if not req.get("detach_token"):
        return {}
    why = ""
    if st.data_state != "OK":
        why = f"the target data state is {st.data_state}"
    else:
        root = os.path.normpath(st.target_path)
        for other in list(svc.target.states.values()):
            p = os.path.normpath(other.target_path)
            if (
                other is not st
                and other.connected
                and (p == root or p.startswith(root + "/") or root.startswith(p + "/"))
            ):
                why = f"another source ({other.source_node}) writes to {p}"
                break
    journals: Journals | None = getattr(svc, "journals", None)
    if journals is None:
        why = why or "this service keeps no journals"
    if why:
        return {"detach_token_refused": why}
    assert journals is not None
    return {"detach_token": journals.tokens.issue(st.target_path)}


def check_open_token(svc: Service, req: dict[str, Any]) -> dict[str, Any]:
    """The ``open`` answer's fields for a presented ``detach_token`` (consumed here)."""
    tok = req.get("detach_token")
    if not tok:
        return {}
    journals: Journals | None = getattr(svc, "journals", None)
    if journals is None:
        return {"detach_token_valid": False, "detach_token_reason": "no journal support"}
    ok, why = journals.tokens.check(str(req.get("target_path", "")), str(tok))
    return {"detach_token_valid": ok, "detach_token_reason": why}

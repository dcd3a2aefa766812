"""The source queue of one connection: ordered items, lazy reads, rename-safe dedup,
memory spilling to disk transaction logs.

Items are either *eager* ops (DELETE, RENAME, BARRIER: everything they need is known when
the change is captured) or *lazy* items (CONTENT, ATTRS, MKDIR, SYMLINK) that read the
file system when they are sent, so what reaches the target is never older than what
the queue position promises ([L4956-4957], DESIGN §2 "mirror data never overwrites newer
replicated data").

Why lazy items are safe: every change on the source produces an event *after* the
change, so the last item for a path always reads the latest state. The one trap is a
rename: a lazy item queued for ``a`` before ``rename a -> b`` would, when sent, read
the *new* ``a`` (or nothing). So a rename cancels the pending lazy items below ``a``
and re-queues them, in their original order, *after* the rename and under ``b``.
A delete cancels the pending lazy items below the deleted path.

Memory and disk (seed §5.1 [L4950-4956]): memory holds the *oldest* items, up to
QMemoryBufferMax; once it is full, new items go to disk only, and while any item is
held only on disk every new item goes to disk too (FIFO across the boundary). The
consumer reads from memory; memory is refilled from the oldest log. With a journal
(``dtake.service.diskqueue``) every item is also written through to the logs, so
memory is a bounded cache of the head of the logs and a restart replays them.

Dedup and cancellation across the boundary (the decision): the dedup index covers the
in-memory items only; nothing in memory describes what is on disk, so memory stays
bounded whatever the disk queue holds. Items read back from disk are instead made safe
by *identity*: every lazy item records the inode its path had when it was queued, and
an item read back from disk whose path now names another inode (or, recorded as
missing, now exists) is dropped — its file was renamed away or replaced, and a later
item covers the new file. What a rename moved must then be re-sent under the new name:
``disk_may_hold(path)`` (a Bloom filter over the on-disk paths and their parents) tells
the caller to queue the destination subtree after the rename. A dedup hit merges into
the in-memory item only when the inode is unchanged; otherwise a new item is queued,
so the journal never depends on an in-memory merge.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import xxhash

from dtake.ops import Op, OpKind
from dtake.service.diskqueue import DiskJournal, JournalReader

__all__ = [
    "FILE_ENTRY_OVERHEAD",
    "ITEM_OVERHEAD",
    "NAME_OVERHEAD",
    "OP_OVERHEAD",
    "TAGS_OVERHEAD",
    "Item",
    "LazyKind",
    "SourceQueue",
    "op_cost",
]

# Memory accounting (issue 5: the daemon stays within QMemoryBufferMax plus a small
# fixed overhead). Measured with tracemalloc on CPython 3.11 (tests/unit/test_queue.py
# checks the estimate against a fresh measurement): a queued item (Item with its
# meta dict, the dedup index entry, the deque slot) costs about 250 bytes plus its
# path; an op about 300 bytes plus its path(s), data and link, and ~230 more with tags.
ITEM_OVERHEAD = 272
OP_OVERHEAD = 320
TAGS_OVERHEAD = 232
NAME_OVERHEAD = 57  # a name in a FILES item (str object and list slot), plus its length
FILE_ENTRY_OVERHEAD = 330  # an entry of a FILES op (a 6-field list, its ints and name)


def op_cost(op: Op) -> int:
    """Bytes of memory one op holds (queued, or in flight until acknowledged)."""
    cost = OP_OVERHEAD + len(op.path) + len(op.data)
    if op.kind is OpKind.FILES:
        files = op.tags.get("files") or ()
        cost += FILE_ENTRY_OVERHEAD * len(files) + sum(len(f[0]) for f in files)
    if op.new_path:
        cost += len(op.new_path)
    if op.link:
        cost += len(op.link)
    if op.tags:
        cost += TAGS_OVERHEAD
    return cost


class LazyKind:
    CONTENT = "content"
    ATTRS = "attrs"
    MKDIR = "mkdir"
    SYMLINK = "symlink"
    MIRROR_END = "mirror_end"  # marker: the mirror walk has queued everything
    # Small regular files of one directory from a mirror walk: ``path`` is the directory,
    # ``meta["names"]`` the files' names; sent as FILES ops (one read loop, one op for
    # many files). Never merged with another item; a rename or delete of the directory
    # (or above) moves or cancels it like any lazy item; one of its files renamed or
    # deleted is found gone when read and explained by that RENAME/DELETE (vanished.py).
    FILES = "files"


@dataclass(slots=True, eq=False)
class Item:
    order: int
    lazy: str | None = None  # LazyKind, or None for an eager op
    path: str = ""  # absolute source path for lazy items
    op: Op | None = None  # eager op (paths already relative)
    mode: str = "realtime"  # realtime | full | differences | checksum | newer
    cancelled: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    ino: int = 0  # inode of `path` when queued (0: it did not exist)
    from_disk: bool = False  # read back from a log: validated by identity when taken
    gen: int = -1  # refill generation it was read back in (merging on refill, below)
    # FILES: the read-ahead shared with the walk (dtake.service.smallfiles; never logged)
    prefetch: Any = None

    def cost(self) -> int:
        """Accounted memory (constant for the item's life: path, names and op never
        change)."""
        cost = ITEM_OVERHEAD + len(self.path) + (op_cost(self.op) if self.op else 0)
        if self.lazy == LazyKind.FILES:
            names = self.meta.get("names") or ()
            cost += NAME_OVERHEAD * len(names) + sum(map(len, names)) + self.meta.get("bytes", 0)
        return cost

    def encode(self, packer: msgpack.Packer | None = None) -> bytes:
        """The item's log record; ``packer``: one reused for a slice of items (packb
        builds a Packer per call: a third of the cost of a walked item's record)."""
        fields = [
            self.order,
            self.lazy,
            self.path,
            self.op.to_wire() if self.op else None,
            self.mode,
            self.meta or None,
            self.ino,
        ]
        if packer is not None:
            return cast(bytes, packer.pack(fields))
        return cast(bytes, msgpack.packb(fields, use_bin_type=True))

    @classmethod
    def decode(cls, payload: bytes) -> Item:
        order, lazy, path, op, mode, meta, ino = msgpack.unpackb(payload, raw=False)
        return cls(
            int(order),
            lazy=lazy,
            path=str(path),
            op=Op.from_wire(op) if op is not None else None,
            mode=str(mode),
            meta=dict(meta or {}),
            ino=int(ino),
            from_disk=True,
        )


def _key(item: Item) -> tuple[str, str]:
    """An item's key in the pending index: (kind, path); a FILES item's path part is
    its directory with its own order below it, so it is unique and still under every
    directory that contains its files (``_under``)."""
    if item.lazy == LazyKind.FILES:
        return LazyKind.FILES, f"{item.path}/\0{item.order}"
    return item.lazy or "", item.path


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _ino(path: str) -> int:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return 0


class _Bloom:
    """Paths (and their parents) that may be held only on disk; reset when none is."""

    BITS = 1 << 20  # 128 KiB, fixed: memory does not grow with the disk queue

    def __init__(self) -> None:
        self._bits = bytearray(self.BITS // 8)
        self.empty = True

    def _idx(self, key: str) -> tuple[int, int, int]:
        h = xxhash.xxh3_128_intdigest(key.encode("utf-8", "surrogateescape"))
        m = self.BITS - 1
        return h & m, (h >> 40) & m, (h >> 80) & m

    def add_path(self, path: str) -> None:
        p = path
        while p and p != "/":
            for i in self._idx(p):
                self._bits[i >> 3] |= 1 << (i & 7)
            p = os.path.dirname(p)
        self.empty = False

    def may_hold(self, path: str) -> bool:
        if self.empty:
            return False
        return all(self._bits[i >> 3] & (1 << (i & 7)) for i in self._idx(path))

    def reset(self) -> None:
        if not self.empty:
            self._bits = bytearray(self.BITS // 8)
            self.empty = True


class SourceQueue:
    """FIFO of items: memory up to ``max_bytes`` (QMemoryBufferMax), then the journal.

    ``put`` returns False when the queue is exhausted (memory full and no journal, or the
    journal at DiskQueueMaxSize / DiskFreeSpaceMin): the caller then auto-disconnects and
    marks the connection Mirror Required (nothing lost silently: a difference mirror
    replaces what could not be queued) and calls ``clear``.
    """

    def __init__(self, max_bytes: int, *, journal: DiskJournal | None = None) -> None:
        self.max_bytes = max_bytes
        # Ops sent but not yet acknowledged (the connection's in-flight window, set by
        # the sender): they count against the same memory limit as the queued items, so
        # the items get what the window does not reserve (``reserve``).
        self.inflight_bytes = 0
        self.budget = max_bytes
        self.peak_bytes = 0
        self._items: deque[Item] = deque()
        self._pending: dict[tuple[str, str], Item] = {}
        self._cancelled = 0  # cancelled items still in _items (len() without a scan)
        self._order = itertools.count(1)
        self._bytes = 0
        self.cond = threading.Condition()
        self.overflowed = False
        self.exhausted_reason = ""
        self.journal = journal
        self._reader = JournalReader(journal) if journal is not None else None
        self._disk_items = 0  # items held only on disk
        self._disk_bytes = 0  # their record bytes (what DiskQueueMaxSize limits)
        self._bloom = _Bloom()
        self._sent: deque[tuple[int, int]] = deque()  # (first seq, item order), unacked
        self._skip_through = 0  # reloaded items at or below this order were applied
        self._reload_upto = 0  # items at or below this order come from before a restart
        self.stats = {
            "spilled_items": 0,
            "refilled_items": 0,
            "dropped_stale": 0,
            "merged_on_refill": 0,
        }
        self._refill_gen = 0  # bumped by every eager op or marker read back from disk
        if journal is not None:
            self._open_journal(journal)

    @classmethod
    def for_connection(
        cls, qcfg: Any, host: str, port: int, con_id: int, conn_uuid: str
    ) -> SourceQueue:
        """The queue of one connection from the service's queue settings: memory only
        when DiskQueueMaxSize is 0, else with transaction logs in DiskQueueFolder."""
        from dtake.service.diskqueue import journal_prefix

        mem = int(float(qcfg.memory_max_mb) * 1024 * 1024)
        disk_max = qcfg.disk_max_mb
        if disk_max is not None and float(disk_max) <= 0:
            return cls(mem)
        journal = DiskJournal(
            qcfg.disk_folder,
            journal_prefix(host, port, con_id, conn_uuid),
            max_bytes=None if disk_max is None else int(float(disk_max) * 1024 * 1024),
            free_min_bytes=int(float(qcfg.disk_free_min_mb) * 1024 * 1024),
        )
        return cls(mem, journal=journal)

    # -- journal ---------------------------------------------------------------
    def _open_journal(self, journal: DiskJournal) -> None:
        last = 0

        def scan(payload: bytes) -> int:
            nonlocal last
            item = Item.decode(payload)
            last = max(last, item.order)
            self._disk_items += 1
            self._disk_bytes += len(payload) + 8
            if item.lazy is not None and item.path:
                self._bloom.add_path(item.path)
            return item.order

        journal.open(scan)
        if not journal.trusted:
            self._disk_items = self._disk_bytes = 0
            self._bloom.reset()
        self._reload_upto = last
        self._order = itertools.count(max(last, journal.acked_order) + 1)

    @property
    def spilled(self) -> bool:
        return self._disk_items > 0

    @property
    def reloaded(self) -> int:
        """Items read back from logs written before this process started."""
        return self.journal.reloaded_records if self.journal and self.journal.trusted else 0

    def resume_from(self, last_item: int) -> None:
        """The target reports it has applied every item up to ``last_item`` (from a
        previous run of this service): replay only what follows."""
        with self.cond:
            self._skip_through = max(self._skip_through, min(last_item, self._reload_upto))

    def _store(self, item: Item) -> bool:
        """Write-through to the journal and keep in memory when it fits (FIFO: never
        while older items are held only on disk)."""
        cost = item.cost()
        to_memory = not self.spilled and self._bytes + cost <= self.budget
        if self.journal is None:
            if not to_memory:
                self.overflowed = True
                self.exhausted_reason = "memory queue limit (QMemoryBufferMax) reached"
                return False
        else:
            payload = item.encode()
            n = len(payload) + 8
            if not self.journal.check_space(n, 0 if to_memory else self._disk_bytes):
                self.overflowed = True
                self.exhausted_reason = self.journal.exhausted_reason
                return False
            try:
                self.journal.append(payload, item.order)
            except OSError as exc:
                self.overflowed = True
                self.exhausted_reason = f"queue log write failed: {exc}"
                return False
            if not to_memory:
                self._disk_items += 1
                self._disk_bytes += n
                self.stats["spilled_items"] += 1
                if item.lazy is not None and item.path:
                    self._bloom.add_path(item.path)
                self.cond.notify_all()
                return True
            assert self._reader is not None
            # The reader's position follows the writer while nothing is only on disk.
            self._reader.file_index = len(self.journal.files) - 1
            self._reader.offset = self.journal.files[-1].size
        self._items.append(item)
        self._bytes += cost
        self.note_peak()
        if item.lazy is not None and item.lazy != LazyKind.MIRROR_END:
            self._pending[_key(item)] = item
        self.cond.notify_all()
        return True

    def _refill(self) -> int:
        """Move the oldest on-disk items into memory, up to the budget; returns the
        number of records read."""
        if self.journal is None or self._reader is None or not self.spilled:
            return 0
        n = 0
        while self._bytes < self.budget or not self._items:
            payload = self._reader.next()
            if payload is None:
                break
            n += 1
            item = Item.decode(payload)
            self._disk_items -= 1
            self._disk_bytes -= len(payload) + 8
            self.stats["refilled_items"] += 1
            if item.order <= self._skip_through:
                continue
            if item.lazy == LazyKind.MIRROR_END and item.order <= self._reload_upto:
                continue  # the mirror that queued it died with the previous process
            if item.lazy is None or item.lazy == LazyKind.MIRROR_END or not item.path:
                self._refill_gen += 1  # an eager op or a marker: nothing merges across it
            else:
                key = _key(item)  # (a FILES item's is its own: never merged)
                old = self._pending.get(key)
                if (
                    old is not None
                    and old.gen == self._refill_gen
                    and not old.cancelled
                    and old.ino == item.ino
                    and old.order < item.order
                ):
                    # The dedup of put_lazy, on the way back from disk: an item for the
                    # same file, read back since the last eager op and not taken yet,
                    # reads the latest state when it is sent (after this item's change).
                    if item.mode != "realtime":
                        old.mode = item.mode
                    old.meta.update(item.meta)
                    self.stats["merged_on_refill"] += 1
                    continue
                item.gen = self._refill_gen
            self._items.append(item)
            self._bytes += item.cost()
            self.note_peak()
            if item.lazy is not None and item.lazy != LazyKind.MIRROR_END:
                key = _key(item)
                old = self._pending.get(key)
                if old is None or old.order < item.order:
                    self._pending[key] = item
        if self._disk_items <= 0 or n == 0:
            # Caught up with the writer (n == 0 with items counted: a log was
            # removed under us; never spin on a count that cannot be read).
            self._disk_items = 0
            self._disk_bytes = 0
            self._bloom.reset()
        return n

    def _valid(self, item: Item) -> bool:
        """Identity check for items read back from disk (see the module docstring)."""
        if not item.from_disk or item.lazy is None or not item.path:
            return True
        if item.lazy == LazyKind.MIRROR_END:
            return True
        now = _ino(item.path)
        if now == 0 or now == item.ino:
            return True  # gone (the sender skips it) or the same file
        self.stats["dropped_stale"] += 1
        return False

    # -- producers -------------------------------------------------------------
    def _append(self, item: Item) -> bool:
        return self._store(item)

    def put_lazy(
        self, kind: str, path: str, *, mode: str = "realtime", ino: int | None = None, **meta: Any
    ) -> bool:
        """Queue a lazy item; ``ino``: the path's inode if the caller has just seen it
        (a mirror walk), else it is looked up here (only with a journal)."""
        if self.journal is None:
            ino = 0
        elif ino is None:
            ino = _ino(path)
        with self.cond:
            return self._put_lazy_locked(kind, path, mode, ino, meta)

    def _put_lazy_locked(
        self, kind: str, path: str, mode: str, ino: int, meta: dict[str, Any] | None = None
    ) -> bool:
        old = self._pending.get((kind, path))
        if old is not None and not old.cancelled and old.ino == ino:
            # Dedup: the queued item will read the latest state anyway. A stronger
            # mirror mode (full/checksum) must not be downgraded to realtime.
            if mode != "realtime":
                old.mode = mode
            if meta:
                old.meta.update(meta)
            return True
        item = Item(next(self._order), lazy=kind, path=path, mode=mode, meta=meta or {}, ino=ino)
        return self._append(item)

    def put_lazy_many(self, entries: list[tuple[str, str, str, int]]) -> bool:
        """Queue lazy items ``(kind, path, mode, ino)`` in order, as ``put_lazy`` would
        one by one (same dedup, memory/disk split and limits), with one lock round trip
        and one log ``write(2)`` per part that stays in memory and per part that goes to
        disk only. Durability is ``put_lazy``'s: every item is in the logs (page cache)
        when this returns. For a mirror walk's slice of one directory."""
        with self.cond:
            if self.journal is None:
                return all(self._put_lazy_locked(k, p, m, 0) for k, p, m, _ in entries)
            pending = self._pending
            fresh: dict[tuple[str, str], Item] = {}  # a path twice in ``entries``: merged
            items: list[Item] = []
            for kind, path, mode, ino in entries:
                key = (kind, path)
                old = fresh.get(key) or pending.get(key)
                if old is not None and not old.cancelled and old.ino == ino:
                    if mode != "realtime":
                        old.mode = mode
                    continue
                item = Item(next(self._order), lazy=kind, path=path, mode=mode, ino=ino)
                fresh[key] = item
                items.append(item)
            return self._store_many(items)

    def put_files(
        self,
        path: str,
        names: list[str],
        *,
        mode: str,
        data_bytes: int = 0,
        ino: int | None = None,
        prefetch: Any = None,
    ) -> tuple[bool, bool, list[str]]:
        """Queue a FILES item: the small files ``names`` of directory ``path``, of
        ``data_bytes`` bytes in all (a mirror walk's; ``ino``: the directory's inode,
        looked up if None). Its cost counts the data, which may be read ahead into
        ``prefetch`` (dtake.service.smallfiles) while it waits.

        With ``prefetch``, a name that has a CONTENT or ATTRS item waiting in memory is
        queued as a CONTENT item instead (merged into the waiting one, as the walk's
        per-file items are): a later change of that file would be merged into the
        waiting item, *in front of* the FILES item, whose data was read before that
        change. Returns (queued, held in memory, the names queued that way): an item
        that went to disk only is read when it is taken."""
        if self.journal is None:
            ino = 0
        elif ino is None:
            ino = _ino(path)
        with self.cond:
            moved: list[str] = []
            if prefetch is not None:
                pending = self._pending
                prefix = path if path.endswith("/") else path + "/"
                C, A = LazyKind.CONTENT, LazyKind.ATTRS
                moved = [
                    n for n in names if (C, prefix + n) in pending or (A, prefix + n) in pending
                ]
                if moved:
                    gone = set(moved)
                    names = [n for n in names if n not in gone]
                    for n in moved:
                        p = prefix + n
                        if not self._put_lazy_locked(C, p, mode, _ino(p) if self.journal else 0):
                            return False, False, moved
            if not names:
                return True, False, moved
            item = Item(
                next(self._order),
                lazy=LazyKind.FILES,
                path=path,
                mode=mode,
                meta={"names": names, "bytes": data_bytes},
                ino=ino,
                prefetch=prefetch,
            )
            ok = self._append(item)
            return ok, ok and bool(self._items) and self._items[-1] is item, moved

    def _store_many(self, items: list[Item]) -> bool:
        """``_store`` for several items (journal only): the ones that fit in memory
        (a prefix: FIFO) and the rest, each part written with one ``append_many``."""
        assert self.journal is not None and self._reader is not None
        room = self.budget - self._bytes
        split = 0
        if not self.spilled:
            for item in items:
                room -= item.cost()
                if room < 0:
                    break
                split += 1
        packer = msgpack.Packer(use_bin_type=True)
        payloads = [item.encode(packer) for item in items]
        head = sum(len(p) + 8 for p in payloads[:split])
        tail = sum(len(p) + 8 for p in payloads[split:])
        # Free space for both parts; DiskQueueMaxSize for the part held only on disk
        # (check_space tests only_on_disk + n against it: disk bytes + tail).
        if not self.journal.check_space(head + tail, self._disk_bytes - head):
            # A limit is near: one by one, to stop at exactly the item put_lazy would.
            self.journal.exhausted_reason = ""
            return all(self._store(item) for item in items)
        try:
            if split:
                self.journal.append_many([(payloads[i], items[i].order) for i in range(split)])
                # The reader's position follows the writer while nothing is only on disk.
                self._reader.file_index = len(self.journal.files) - 1
                self._reader.offset = self.journal.files[-1].size
            if split < len(items):
                self.journal.append_many(
                    [(payloads[i], items[i].order) for i in range(split, len(items))]
                )
        except OSError as exc:
            self.overflowed = True
            self.exhausted_reason = f"queue log write failed: {exc}"
            return False
        for item in items[:split]:
            self._items.append(item)
            self._bytes += item.cost()
            self._pending[_key(item)] = item
        for item in items[split:]:
            self._disk_items += 1
            self.stats["spilled_items"] += 1
            self._bloom.add_path(item.path)
        self._disk_bytes += tail
        self.note_peak()
        self.cond.notify_all()
        return True

    def put_op(self, op: Op, **meta: Any) -> bool:
        with self.cond:
            return self._append(Item(next(self._order), op=op, meta=meta))

    def put_delete(self, src_abs: str, op: Op) -> bool:
        with self.cond:
            for key, item in list(self._pending.items()):
                if _under(key[1], src_abs):
                    item.cancelled = True
                    self._cancelled += 1
                    del self._pending[key]
            return self._append(Item(next(self._order), op=op))

    def put_rename(self, src_abs: str, dst_abs: str, op: Op) -> bool:
        with self.cond:
            moved = sorted(
                (item for key, item in self._pending.items() if _under(key[1], src_abs)),
                key=lambda it: it.order,
            )
            for item in moved:
                item.cancelled = True
                self._cancelled += 1
                del self._pending[_key(item)]
            if not self._append(Item(next(self._order), op=op)):
                return False
            for item in moved:
                new_path = dst_abs + item.path[len(src_abs) :]
                if not self._append(
                    Item(
                        next(self._order),
                        lazy=item.lazy,
                        path=new_path,
                        mode=item.mode,
                        meta=item.meta,
                        ino=item.ino,
                    )
                ):
                    return False
            return True

    def pending(self, kind: str, path: str) -> bool:
        """Is an item of ``kind`` for ``path`` waiting in memory?"""
        with self.cond:
            return (kind, path) in self._pending

    def disk_may_hold(self, path: str) -> bool:
        """May items for ``path`` or below it be held only on disk? (Then a rename of
        ``path`` must be followed by a re-send of its destination.)"""
        with self.cond:
            return self._bloom.may_hold(path)

    def put_marker(self, kind: str, **meta: Any) -> bool:
        with self.cond:
            return self._append(Item(next(self._order), lazy=kind, meta=meta))

    # -- consumer --------------------------------------------------------------
    def get(self, timeout: float | None) -> Item | None:
        items = self.get_many(1, timeout)
        return items[0] if items else None

    def get_many(self, n: int, timeout: float | None) -> list[Item]:
        """Up to ``n`` items, oldest first, with one lock round trip: waits (up to
        ``timeout``; None: for ever) for the first, takes what else is ready."""
        out: list[Item] = []
        with self.cond:
            while True:
                item = self._take()
                if item is not None:
                    out.append(item)
                    if len(out) < n:
                        continue
                    return out
                if out:
                    return out
                if timeout is not None and timeout <= 0:
                    return out
                if not self.cond.wait(timeout):
                    return out
                timeout = 0 if timeout is not None else None

    def _take(self) -> Item | None:
        """The next valid item, or None when nothing is ready (lock held)."""
        while True:
            if self.spilled and self._bytes < self.budget // 2 + 1:
                self._refill()
            while self._items and self._items[0].cancelled:
                dead = self._items.popleft()
                self._cancelled -= 1
                self._bytes -= dead.cost()
            if self._items:
                item = self._items.popleft()
                self._bytes -= item.cost()
                if item.lazy is not None:
                    key = _key(item)
                    if self._pending.get(key) is item:
                        del self._pending[key]
                if not self._valid(item):
                    continue
                return item
            if self.spilled and self._refill():
                continue
            return None

    def wait_room(self, stop: Callable[[], bool]) -> None:
        """Mirror flow control: wait while the queue is more than half full (memory)
        or holds items on disk, so a mirror walk never exhausts it ([L4994]: the
        mirror is paused and resumed by itself when the target cannot keep up)."""
        while not stop():
            with self.cond:
                if not self.spilled and self._bytes <= self.budget // 2:
                    return
            time.sleep(0.05)

    def unget(self, item: Item) -> None:
        self.unget_many([item])

    def unget_many(self, items: list[Item]) -> None:
        """Put back items the sender could not finish (the socket was lost), in their
        order: they are taken again first, after the reconnect."""
        with self.cond:
            for item in reversed(items):
                self._items.appendleft(item)
                self._bytes += item.cost()
                if item.lazy is not None and item.lazy != LazyKind.MIRROR_END:
                    self._pending.setdefault(_key(item), item)
            self.cond.notify_all()

    # -- acknowledgements (journal trimming) -----------------------------------
    def note_sent(self, notes: list[tuple[int, int]]) -> None:
        """``(first_seq, order)``: the first op of item ``order`` got sequence number
        ``first_seq`` (in sending order; noted before those ops are on the wire)."""
        if self.journal is not None and notes:
            with self.cond:
                self._sent.extend(notes)

    def acked(self, seq: int) -> None:
        """The target applied every op up to ``seq``. An item is known complete once
        the first op of the *next* item is acknowledged (one item of lag, replay-safe)."""
        if self.journal is None or self._reader is None:
            return
        with self.cond:
            done = 0
            while self._sent and self._sent[0][0] <= seq:
                done = self._sent.popleft()[1] - 1
            if done > 0:
                self.journal.release(done, reader=self._reader)

    def clear(self) -> None:
        with self.cond:
            self._items.clear()
            self._cancelled = 0
            self._pending.clear()
            self._bytes = 0
            self._disk_items = 0
            self._disk_bytes = 0
            self._sent.clear()
            self._bloom.reset()
            if self.journal is not None and self._reader is not None:
                self.journal.clear(self._reader)
            self.overflowed = False
            self.cond.notify_all()

    def close(self, *, clean: bool = True) -> None:
        """Service stop: keep the logs for the next start (memory is in them already)."""
        with self.cond:
            if self.journal is not None:
                self.journal.close(clean=clean)

    def discard(self) -> None:
        """The connection is removed: delete its logs."""
        with self.cond:
            self._items.clear()
            self._cancelled = 0
            self._pending.clear()
            self._bytes = 0
            self._disk_items = self._disk_bytes = 0
            if self.journal is not None:
                self.journal.discard()

    def __len__(self) -> int:
        with self.cond:
            return len(self._items) - self._cancelled + self._disk_items

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of items held only on disk (the seed's "Disk Queue (Bytes)")."""
        return self._disk_bytes

    def figures(self) -> dict[str, Any]:
        with self.cond:
            return {
                "memory_items": len(self._items) - self._cancelled,
                "memory_bytes": self._bytes,
                "memory_max_bytes": self.max_bytes,
                "inflight_bytes": self.inflight_bytes,
                # What counts against QMemoryBufferMax: queued items + in-flight ops.
                "accounted_bytes": self._bytes + self.inflight_bytes,
                "accounted_peak_bytes": self.peak_bytes,
                "disk_items": self._disk_items,
                "disk_bytes": self._disk_bytes,
                "disk_max_bytes": self.journal.max_bytes if self.journal else 0,
                "log_files": len(self.journal.files) if self.journal else 0,
                "log_bytes": self.journal.total_bytes if self.journal else 0,
                "reloaded_items": self.reloaded,
                "exhausted_reason": self.exhausted_reason or None,
                **self.stats,
            }

    def reserve(self, nbytes: int) -> None:
        """Keep ``nbytes`` of the memory limit for the sender's in-flight window: queued
        items get the rest (at least a quarter of the limit, for tiny limits)."""
        with self.cond:
            self.budget = max(self.max_bytes // 4, self.max_bytes - nbytes)

    def note_peak(self) -> None:
        """Record the highest accounted memory (queued + in flight) seen so far."""
        total = self._bytes + self.inflight_bytes
        if total > self.peak_bytes:
            self.peak_bytes = total

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

"""The source queue of one connection: ordered items, lazy reads, rename-safe dedup.

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
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dtake.ops import Op

__all__ = ["Item", "LazyKind", "SourceQueue"]


class LazyKind:
    CONTENT = "content"
    ATTRS = "attrs"
    MKDIR = "mkdir"
    SYMLINK = "symlink"
    MIRROR_END = "mirror_end"  # marker: the mirror walk has queued everything


@dataclass(slots=True, eq=False)
class Item:
    order: int
    lazy: str | None = None  # LazyKind, or None for an eager op
    path: str = ""  # absolute source path for lazy items
    op: Op | None = None  # eager op (paths already relative)
    mode: str = "realtime"  # realtime | full | differences | checksum | newer
    cancelled: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def cost(self) -> int:
        return 96 + len(self.path) + (self.op.wire_size() if self.op else 0)


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


class SourceQueue:
    """FIFO of items with a byte budget (QMemoryBufferMax) and rename-aware dedup.

    ``put`` returns False when the budget is exhausted: the caller then marks the
    connection Mirror Required (nothing lost silently: a difference mirror replaces
    what could not be queued) and calls ``clear``.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[Item] = deque()
        self._pending: dict[tuple[str, str], Item] = {}
        self._order = itertools.count(1)
        self._bytes = 0
        self.cond = threading.Condition()
        self.overflowed = False

    # -- producers -------------------------------------------------------------
    def _append(self, item: Item) -> bool:
        cost = item.cost()
        if self._bytes + cost > self.max_bytes:
            self.overflowed = True
            return False
        self._items.append(item)
        self._bytes += cost
        if item.lazy is not None and item.lazy != LazyKind.MIRROR_END:
            self._pending[(item.lazy, item.path)] = item
        self.cond.notify_all()
        return True

    def put_lazy(self, kind: str, path: str, *, mode: str = "realtime", **meta: Any) -> bool:
        with self.cond:
            old = self._pending.get((kind, path))
            if old is not None and not old.cancelled:
                # Dedup: the queued item will read the latest state anyway. A stronger
                # mirror mode (full/checksum) must not be downgraded to realtime.
                if mode != "realtime":
                    old.mode = mode
                old.meta.update(meta)
                return True
            return self._append(Item(next(self._order), lazy=kind, path=path, mode=mode, meta=meta))

    def put_op(self, op: Op, **meta: Any) -> bool:
        with self.cond:
            return self._append(Item(next(self._order), op=op, meta=meta))

    def put_delete(self, src_abs: str, op: Op) -> bool:
        with self.cond:
            for key, item in list(self._pending.items()):
                if _under(key[1], src_abs):
                    item.cancelled = True
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
                del self._pending[(item.lazy or "", item.path)]
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
                    )
                ):
                    return False
            return True

    def put_marker(self, kind: str, **meta: Any) -> bool:
        with self.cond:
            return self._append(Item(next(self._order), lazy=kind, meta=meta))

    # -- consumer --------------------------------------------------------------
    def get(self, timeout: float | None) -> Item | None:
        with self.cond:
            while True:
                while self._items and self._items[0].cancelled:
                    dead = self._items.popleft()
                    self._bytes -= dead.cost()
                if self._items:
                    item = self._items.popleft()
                    self._bytes -= item.cost()
                    if item.lazy is not None and self._pending.get((item.lazy, item.path)) is item:
                        del self._pending[(item.lazy, item.path)]
                    return item
                if timeout is not None and timeout <= 0:
                    return None
                if not self.cond.wait(timeout):
                    return None
                timeout = 0 if timeout is not None else None

    def clear(self) -> None:
        with self.cond:
            self._items.clear()
            self._pending.clear()
            self._bytes = 0
            self.overflowed = False
            self.cond.notify_all()

    def __len__(self) -> int:
        with self.cond:
            return sum(1 for it in self._items if not it.cancelled)

    @property
    def bytes(self) -> int:
        return self._bytes

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

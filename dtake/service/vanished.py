"""Paths the sender found gone when it read them, until a rename or delete explains it.

A lazy queue item (dtake.service.queue) reads its path when it is sent; when the path
is gone the item is skipped, because a later DELETE or RENAME in the queue tells the
target. For a RENAME that is only true of what the target already has. The capture
thread can lag behind the disk (load): ``mkdir d; write d/f; mv d d2`` can reach the
sender as "MKDIR d, CONTENT d/f" read *after* the rename, both skipped, and then the
rename event, whose ``put_rename`` finds nothing left to move (the items were taken).
The target is told to rename a ``d`` it never got: ``d2`` is lost, silently. The same
with the usual ``write tmp; mv tmp file`` save: the target keeps the old ``file``.

So the sender remembers what it skipped, and when it sends a RENAME whose source
covers a remembered path, it sends what is now at the new name (a directory with what
is below it). The RENAME is always sent after the skipped item: the item was taken from
the queue before ``put_rename`` ran (else it would have been moved), so the RENAME was
queued behind it. A DELETE covering a path forgets it.

A path whose disappearance was already explained is never forgotten that way (a mirror
walk's entry for a file deleted while the walk's list waited). The set is bounded:
past ``max_paths``, entries older than ``ttl`` are dropped (a rename event that old
would mean the capture lags by minutes; its kernel queue overflows long before, which
remirrors), and if that is not enough ``add`` returns False and the caller remirrors.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["VanishedPaths"]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


class VanishedPaths:
    """Absolute paths -> the lazy kind of the item that found them gone. One thread
    (the sender) uses it; ``clear`` swaps in new maps, so another thread may call it."""

    def __init__(
        self,
        *,
        max_paths: int = 16384,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_paths = max_paths
        self.ttl = ttl
        self._clock = clock
        self._paths: dict[str, tuple[str, float]] = {}
        self._dirs: dict[str, int] = {}  # every ancestor of a path held -> how many

    def __len__(self) -> int:
        return len(self._paths)

    def __bool__(self) -> bool:
        return bool(self._paths)

    def add(self, path: str, kind: str) -> bool:
        """Remember ``path``; False when the set is full even after expiry."""
        paths = self._paths
        if path in paths:
            paths[path] = (kind if kind != "attrs" else paths[path][0], self._clock())
            return True
        if len(paths) >= self.max_paths:
            self._expire()
            if len(paths) >= self.max_paths:
                return False
        paths[path] = (kind, self._clock())
        dirs = self._dirs
        p = path.rpartition("/")[0]
        while p:
            dirs[p] = dirs.get(p, 0) + 1
            p = p.rpartition("/")[0]
        return True

    def under(self, top: str) -> list[tuple[str, str]]:
        """(path, kind) at or below ``top``, a directory before what is below it."""
        top = top.rstrip("/")
        if top not in self._paths and top not in self._dirs:
            return []  # the usual case, without a scan
        hits = [(p, k) for p, (k, _) in self._paths.items() if _under(p, top)]
        hits.sort(key=lambda h: h[0].split("/"))
        return hits

    def discard(self, path: str) -> None:
        if self._paths.pop(path, None) is None:
            return
        dirs = self._dirs
        p = path.rpartition("/")[0]
        while p:
            n = dirs.get(p, 0) - 1
            if n > 0:
                dirs[p] = n
            else:
                dirs.pop(p, None)
            p = p.rpartition("/")[0]

    def discard_under(self, top: str) -> None:
        for p, _ in self.under(top):
            self.discard(p)

    def clear(self) -> None:
        self._paths = {}
        self._dirs = {}

    def _expire(self) -> None:
        limit = self._clock() - self.ttl
        for p in [p for p, (_, t) in self._paths.items() if t < limit]:
            self.discard(p)

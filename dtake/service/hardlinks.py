"""Files the source skipped because they were hard-linked, until they are sent.

A regular file with more than one name is not replicated: it is reported (event 4099
[L3756]) and skipped, by a mirror and in real time alike. When its other names go away
it is an ordinary file again, but nothing may say so: inotify reports a link count
change only to a watch on the file itself, never to its directory's watch, so the name
left hears nothing when ``rm other`` or ``mv x other`` drops its file's second link.
Its content (changed on the source while it was skipped, or never sent) would not
reach the target until a mirror.

So the sender remembers the paths it skipped, with their inode: a DELETE or RENAME
that drops a name of a remembered inode sends the other names that have one link
left, and an attribute change of a remembered path that has one link left sends its
content. A path sent is forgotten. The map is bounded (the oldest entries go); a name
forgotten that way, or moved with its directory, waits for its next change or a mirror.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["SkippedLinks"]


class SkippedLinks:
    """Absolute paths skipped as hard-linked -> their inode, and inode -> those paths.
    The mirror walk, the capture thread (entries moved into the set) and the sender
    add; a lock keeps the two maps together."""

    def __init__(self, *, max_paths: int = 65536) -> None:
        self.max_paths = max_paths
        self._lock = threading.Lock()
        self._ino: OrderedDict[str, int] = OrderedDict()
        self._names: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return len(self._ino)

    def __bool__(self) -> bool:
        return bool(self._ino)

    def add(self, path: str, ino: int) -> bool:
        """Remember ``path`` (again: as the newest); True when it was not remembered (the
        source reports a path once while it stays skipped: event 4099)."""
        with self._lock:
            new = path not in self._ino
            self._drop(path)
            self._ino[path] = ino
            self._names.setdefault(ino, set()).add(path)
            if len(self._ino) > self.max_paths:
                self._drop(next(iter(self._ino)))
            return new

    def ino_of(self, path: str) -> int | None:
        return self._ino.get(path)

    def names(self, ino: int) -> list[str]:
        with self._lock:
            return sorted(self._names.get(ino, ()))

    def discard(self, path: str) -> None:
        if path in self._ino:
            with self._lock:
                self._drop(path)

    def _drop(self, path: str) -> None:
        ino = self._ino.pop(path, None)
        if ino is None:
            return
        names = self._names[ino]
        names.discard(path)
        if not names:
            del self._names[ino]

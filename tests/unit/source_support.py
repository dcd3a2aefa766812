"""A source connection whose sender is driven by hand, and its target tree (unit tests
of dtake/service/source.py and of what queues for it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dtake.config import QueueConfig
from dtake.ops import Op, OpKind
from dtake.protocol.opwire import expand_files
from dtake.rules import RuleSet
from dtake.service.apply import TargetTree
from dtake.service.source import Connection, ConnRecord

__all__ = ["Events", "Pair", "write"]


class Events:
    def __init__(self) -> None:
        self.emitted: list[tuple[int, dict[str, Any]]] = []

    def emit(self, eid: int, **kw: Any) -> None:
        self.emitted.append((eid, kw))


def write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


class Pair:
    """A source connection whose sender is driven by hand, and its target tree."""

    def __init__(self, tmp_path: Path, *, disk_queue: bool, files: bool = False) -> None:
        self.src = tmp_path / "src"
        self.dst = tmp_path / "dst"
        self.src.mkdir()
        qfolder = tmp_path / "queue"
        qfolder.mkdir()
        qcfg = QueueConfig(
            memory_max_mb=16,
            disk_folder=str(qfolder),
            disk_max_mb=None if disk_queue else 0,
            disk_free_min_mb=0,
        )
        self.events = Events()
        svc = SimpleNamespace(
            cfg=SimpleNamespace(queue=qcfg, auto_remirror=False),
            features={},
            events=self.events,
            is_internal=lambda _p: False,
        )
        rec = ConnRecord(id=1, repset="rs", host="127.0.0.1", port=1, target_path=str(self.dst))
        self.conn = Connection(svc, rec, RuleSet.from_list([f"{self.src} inc, rec"]))  # type: ignore[arg-type]
        self.conn._peer_files = files  # the target announced FILES ops
        self.sent: list[Op] = []
        self.conn._emit = self.sent.append  # type: ignore[method-assign]
        self.tree = TargetTree(str(self.dst))

    def event(
        self, kind: str, path: Path, *, is_dir: bool = False, dest: Path | None = None
    ) -> None:
        """The capture thread dispatches one event."""
        self.conn.on_change(
            kind, str(path), is_dir=is_dir, dest=None if dest is None else str(dest)
        )

    def drain(self) -> None:
        """The sender takes and sends everything queued; the target applies it."""
        while (item := self.conn.queue.get(timeout=0)) is not None:
            self.conn._process(item)
        self.apply_sent()

    def apply_sent(self) -> None:
        """The target applies what was sent (a FILES op as the FILE_END ops it stands
        for, as the receiver does)."""
        for op in self.sent:
            for one in expand_files(op) if op.kind is OpKind.FILES else (op,):
                self.tree.apply(one)
        self.sent.clear()

    def close(self) -> None:
        self.tree.close()
        self.conn.queue.close()

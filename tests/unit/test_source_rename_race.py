"""A rename that reaches the sender's disk reads before its capture event (scripted).

The sender reads a lazy item's path when it sends it. Under load the capture thread can
lag: a file or directory is renamed on disk, the sender takes the items queued for the
old name, finds nothing there and skips them ("a later RENAME tells the target"), and
only then is the rename event dispatched. The RENAME can then move nothing on the
target, and what was never sent under the old name must still reach it under the new
one. Here the two threads are replaced by explicit steps in that order: capture events,
rename on disk, the sender drains the queue, the rename event, the sender drains again;
then the ops are applied to a real target tree and the trees must be equal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dtake.ops import Op
from dtake.testing import tree_diff
from tests.unit.source_support import Pair, write


@pytest.fixture(params=[False, True], ids=["memory-queue", "disk-queue"])
def pair(request: Any, tmp_path: Path) -> Any:
    p = Pair(tmp_path, disk_queue=request.param)
    yield p
    p.close()


def test_new_directory_renamed_before_the_sender_reads_it(pair: Pair) -> None:
    d, moved = pair.src / "d001", pair.src / "d001-moved"
    d.mkdir()
    write(d / "f0000", "zero")
    write(d / "f0001", "one")
    pair.event("mkdir", d, is_dir=True)
    pair.event("closed_write", d / "f0000")
    pair.event("closed_write", d / "f0001")
    os.rename(d, moved)
    pair.drain()  # the sender got there first: every path it reads is gone
    pair.event("moved", d, is_dir=True, dest=moved)
    pair.drain()
    assert tree_diff(str(pair.src), str(pair.dst)) == []


def test_atomic_save_renamed_before_the_sender_reads_the_temp_file(pair: Pair) -> None:
    real = pair.src / "config"
    write(real, "version 1")
    pair.event("closed_write", real)
    pair.drain()
    assert (pair.dst / "config").read_text() == "version 1"
    tmp = pair.src / "config.tmp"
    write(tmp, "version 2, longer")
    pair.event("closed_write", tmp)
    os.rename(tmp, real)  # the usual write-then-rename save
    pair.drain()
    pair.event("moved", tmp, dest=real)
    pair.drain()
    assert tree_diff(str(pair.src), str(pair.dst)) == []


def test_renamed_twice_before_either_event(pair: Pair) -> None:
    d = pair.src / "a"
    d.mkdir()
    write(d / "f", "data")
    pair.event("mkdir", d, is_dir=True)
    pair.event("closed_write", d / "f")
    os.rename(d, pair.src / "b")
    os.rename(pair.src / "b", pair.src / "c")
    pair.drain()
    pair.event("moved", d, is_dir=True, dest=pair.src / "b")
    pair.drain()  # "b" is gone too by now
    pair.event("moved", pair.src / "b", is_dir=True, dest=pair.src / "c")
    pair.drain()
    assert tree_diff(str(pair.src), str(pair.dst)) == []


def test_deleted_before_the_sender_reads_it_is_forgotten(pair: Pair) -> None:
    f = pair.src / "gone"
    write(f, "x")
    pair.event("closed_write", f)
    os.unlink(f)
    pair.drain()
    pair.event("deleted", f)
    pair.drain()
    assert tree_diff(str(pair.src), str(pair.dst)) == []
    assert not pair.conn._vanished


def test_vanished_paths_are_bounded() -> None:
    from dtake.service.vanished import VanishedPaths

    now = [0.0]
    v = VanishedPaths(max_paths=3, ttl=10.0, clock=lambda: now[0])
    assert v.add("/s/a/x", "content") and v.add("/s/a/y", "content") and v.add("/s/b", "mkdir")
    assert [p for p, _ in v.under("/s/a")] == ["/s/a/x", "/s/a/y"]
    assert v.under("/s/c") == [] and v.under("/s/a/x") == [("/s/a/x", "content")]
    assert not v.add("/s/c", "content")  # full, nothing old enough to drop: remirror
    now[0] = 11.0
    assert v.add("/s/c", "content") and len(v) == 1  # the old entries expired
    v.discard_under("/s")
    assert not v and v.under("/s") == []


def test_too_many_vanished_paths_remirror(pair: Pair, monkeypatch: Any) -> None:
    pair.conn._vanished.max_paths = 2
    gaps: list[str] = []
    monkeypatch.setattr(pair.conn, "gap", gaps.append)
    for name in ("a", "b", "c"):
        pair.event("closed_write", pair.src / name)  # never existed: gone when read
    pair.drain()
    assert gaps == ["too many paths vanished before they were sent"]


@pytest.mark.parametrize("lagging", [False, True], ids=["queued-before", "capture-lagging"])
def test_file_replaced_before_the_sender_reads_it(pair: Pair, lagging: bool) -> None:
    """Log rotation racing the sender: ``log`` is written, renamed to ``log.1`` and a
    new ``log`` is created before the sender reads the change. The sender sends the new
    file's content under ``log``; the RENAME then moved *that* to ``log.1`` on the
    target, silently (the old content never reached it). The sender remembers which
    inode it sent under a name: a RENAME whose destination is another file now sends it.
    ``lagging``: the capture dispatches the write event only after the rotation."""
    log, old = pair.src / "log", pair.src / "log.1"
    write(log, "line 1\n")
    pair.event("closed_write", log)
    pair.drain()
    with open(log, "a") as fh:
        fh.write("line 2\n")  # same inode
    if not lagging:
        pair.event("closed_write", log)
    os.rename(log, old)
    write(log, "new log\n")  # another inode under the old name
    if lagging:
        pair.event("closed_write", log)
    pair.drain()  # reads the new "log"
    pair.event("moved", log, dest=old)
    pair.event("closed_write", log)
    pair.drain()
    assert tree_diff(str(pair.src), str(pair.dst)) == []
    assert (pair.dst / "log.1").read_text() == "line 1\nline 2\n"


def test_replaced_file_is_still_sent_after_a_lost_connection(pair: Pair) -> None:
    """The connection is lost while the file found at the RENAME's new name is sent:
    the rename item is processed again after the reconnect (the RENAME again, a no-op
    on the target) and the check still sends that file."""
    from dtake.service.source import _Gap

    log, old = pair.src / "log", pair.src / "log.1"
    write(log, "old\n")
    pair.event("closed_write", log)
    pair.drain()
    with open(log, "a") as fh:
        fh.write("more\n")
    os.rename(log, old)
    write(log, "new\n")
    pair.event("closed_write", log)
    pair.drain()  # the new "log" went under "log"
    pair.event("moved", log, dest=old)
    emit = pair.conn._emit
    lost = [True]

    def flaky(op: Op) -> None:
        if op.path == "log.1" and lost[0]:
            lost[0] = False
            raise _Gap()
        emit(op)

    pair.conn._emit = flaky  # type: ignore[method-assign]
    with pytest.raises(_Gap):
        pair.conn._send_taken(pair.conn.queue.get_many(10, timeout=0))
    pair.event("closed_write", log)
    pair.drain()
    assert tree_diff(str(pair.src), str(pair.dst)) == []

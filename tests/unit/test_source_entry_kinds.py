"""Which queue item an entry goes as (Connection._entry_kind): the same rules for the
mirror walk and for real time. Hard-linked files are reported (event 4099 [L3756]) and
not sent; FIFOs, sockets and devices are queued as content, which the sender drops
when it reads them. Real connection and queue, sender driven by hand into a real
target tree (tests/unit/source_support.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.source_support import Pair, write


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path, disk_queue=False)
    yield p
    p.close()


def _special_tree(top: Path) -> None:
    write(top / "plain", "plain")
    write(top / "linked", "two names")
    (top / "sub").mkdir()
    os.link(top / "linked", top / "sub" / "linked2")
    os.mkfifo(top / "fifo")
    os.symlink("plain", top / "link")


def _taken(pair: Pair) -> list[tuple[str, str]]:
    """What is queued, as (kind, path relative to the source), in order; the sender
    then sends it and the target applies it."""
    out = []
    while (item := pair.conn.queue.get(timeout=0)) is not None:
        out.append((str(item.lazy), os.path.relpath(item.path, pair.src)))
        pair.conn._process(item)
    for op in pair.sent:
        pair.tree.apply(op)
    pair.sent.clear()
    return out


def _hardlink_events(pair: Pair) -> list[str]:
    return sorted(
        os.path.relpath(kw["path"], pair.src) for eid, kw in pair.events.emitted if eid == 4099
    )


def test_a_directory_moved_in_is_queued_by_the_walks_rules(pair: Pair, tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "d"
    _special_tree(outside)
    os.rename(outside, pair.src / "d")
    pair.event("moved", outside, is_dir=True, dest=pair.src / "d")
    realtime = _taken(pair)
    assert realtime == [
        ("mkdir", "d"),
        ("content", "d/fifo"),  # dropped by the sender (below)
        ("symlink", "d/link"),
        ("content", "d/plain"),
        ("mkdir", "d/sub"),
    ]
    assert _hardlink_events(pair) == ["d/linked", "d/sub/linked2"]  # reported, not queued
    assert sorted(os.listdir(pair.dst / "d")) == ["link", "plain", "sub"]
    assert os.listdir(pair.dst / "d" / "sub") == []

    # The mirror walk queues the same entries as the same kinds.
    conn = pair.conn
    conn.queue.put_lazy("mkdir", str(pair.src / "d"), mode="full")
    for chunk in conn._walk_dirs(str(pair.src / "d")):
        assert conn._queue_walked(chunk, "full", 0, threading.Event()) is not None
    assert _taken(pair) == realtime


def test_a_fifo_and_a_hard_link_created_in_place_are_not_sent(pair: Pair) -> None:
    # Created events queue content by name; the sender reads the entry: a FIFO is
    # dropped, a hard-linked file (either name) is reported and not sent.
    write(pair.src / "linked", "one name")
    pair.event("created", pair.src / "linked")
    _taken(pair)
    assert (pair.dst / "linked").read_text() == "one name"
    os.mkfifo(pair.src / "fifo")
    pair.event("created", pair.src / "fifo")
    os.link(pair.src / "linked", pair.src / "linked2")
    pair.event("created", pair.src / "linked2")
    pair.event("attrib", pair.src / "linked")  # its link count changed
    _taken(pair)
    assert sorted(os.listdir(pair.dst)) == ["linked"]
    assert _hardlink_events(pair) == ["linked2"]

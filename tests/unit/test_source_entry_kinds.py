"""Which queue item an entry goes as (Connection._entry_kind): the same rules for the
mirror walk and for real time. Hard-linked files are reported (event 4099 [L3756]) and
not sent; FIFOs, sockets and devices are queued as content, which the sender drops
when it reads them. A file skipped while hard-linked whose other name goes away is sent
then, although inotify reports nothing for the name left (a link count change reaches
only a watch on the file itself, never its directory's watch; dtake/service/hardlinks.py).
Real connection and queue, sender driven by hand into a real target tree
(tests/unit/source_support.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtake.service.hardlinks import SkippedLinks
from dtake.service.queue import LazyKind
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
        if item.lazy == LazyKind.FILES:  # a directory's small files: CONTENT by name
            for name in item.meta["names"]:
                out.append(("content", os.path.relpath(f"{item.path}/{name}", pair.src)))
        else:
            out.append((str(item.lazy), os.path.relpath(item.path, pair.src)))
        pair.conn._process(item)
    pair.apply_sent()
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
    # (in another order: a directory's small regular files go last, in a FILES item)
    assert sorted(_taken(pair)) == sorted(realtime)


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
    mode = (pair.dst / "linked").stat().st_mode
    os.chmod(pair.src / "linked", 0o600)  # a chmod of the first name, now one of two
    pair.event("attrib", pair.src / "linked")
    _taken(pair)
    assert sorted(os.listdir(pair.dst)) == ["linked"]
    assert (pair.dst / "linked").stat().st_mode == mode  # hard-linked: nothing sent
    assert _hardlink_events(pair) == ["linked2"]


def _sent_then_linked(pair: Pair) -> tuple[Path, Path]:
    """`a` written and sent, then `b` made another name of it (skipped, reported)."""
    a, b = pair.src / "a", pair.src / "b"
    write(a, "v1")
    pair.event("created", a)
    pair.drain()
    assert (pair.dst / "a").read_text() == "v1"
    os.link(a, b)
    pair.event("created", b)
    pair.drain()
    assert not (pair.dst / "b").exists()
    return a, b


def test_the_name_left_is_sent_when_the_other_name_is_deleted(pair: Pair) -> None:
    _, b = _sent_then_linked(pair)
    b.write_text("v2, written through the other name")
    pair.event("modified", b)
    pair.drain()
    assert (pair.dst / "a").read_text() == "v1"  # skipped while hard-linked
    b.unlink()
    pair.event("deleted", b)  # and nothing for `a`: its directory watch hears nothing
    assert pair.conn.stats["relinked_sent"] == 0
    pair.drain()
    assert (pair.dst / "a").read_text() == "v2, written through the other name"
    assert pair.conn.stats["relinked_sent"] == 1


@pytest.mark.parametrize("renamed", [False, True])
def test_the_new_name_is_sent_when_the_first_name_is_deleted(pair: Pair, renamed: bool) -> None:
    a, left = _sent_then_linked(pair)
    if renamed:  # a skipped name is followed by its renames
        os.rename(left, pair.src / "c")
        pair.event("moved", left, dest=pair.src / "c")
        pair.drain()
        left = pair.src / "c"
        assert not (pair.dst / "c").exists()
    a.unlink()
    pair.event("deleted", a)
    pair.drain()
    assert os.listdir(pair.dst) == [left.name]
    assert (pair.dst / left.name).read_text() == "v1"


def test_a_rename_over_the_other_name_sends_the_name_left(pair: Pair) -> None:
    a, b = _sent_then_linked(pair)
    a.write_text("v2")
    pair.event("modified", a)
    write(pair.src / "tmp", "new b")
    pair.event("created", pair.src / "tmp")
    pair.drain()
    os.rename(pair.src / "tmp", b)  # `b` was the other name of `a`'s file
    pair.event("moved", pair.src / "tmp", dest=b)
    pair.drain()
    assert (pair.dst / "a").read_text() == "v2"
    assert (pair.dst / "b").read_text() == "new b"


def test_names_the_mirror_skipped_are_sent_when_one_is_left(pair: Pair) -> None:
    write(pair.src / "d" / "one", "two names")
    os.link(pair.src / "d" / "one", pair.src / "two")
    conn = pair.conn
    conn.queue.put_lazy("mkdir", str(pair.src), mode="full")
    for chunk in conn._walk_dirs(str(pair.src)):
        assert conn._queue_walked(chunk, "full", 0, threading.Event()) is not None
    pair.drain()
    assert os.listdir(pair.dst / "d") == [] and not (pair.dst / "two").exists()
    (pair.src / "d" / "one").unlink()
    pair.event("deleted", pair.src / "d" / "one")
    pair.drain()
    assert (pair.dst / "two").read_text() == "two names"


def test_an_attribute_change_of_a_skipped_name_left_alone_sends_its_content(
    pair: Pair, tmp_path: Path
) -> None:
    # The other name is outside the set: its removal is no event here. The next
    # attribute change of the name left is sent as content.
    a = pair.src / "a"
    write(a, "v1")
    outside = tmp_path / "outside"
    os.link(a, outside)
    pair.event("created", a)
    pair.drain()
    assert not (pair.dst / "a").exists()
    outside.unlink()
    a.chmod(0o600)
    pair.event("attrib", a)
    pair.drain()
    assert (pair.dst / "a").read_text() == "v1"
    assert pair.conn.stats["relinked_sent"] == 1
    assert (pair.dst / "a").stat().st_mode & 0o777 == 0o600
    # Once sent, an attribute change is only that again.
    pair.conn._send_file = None  # type: ignore[assignment,method-assign]
    a.chmod(0o640)
    pair.event("attrib", a)
    pair.drain()
    assert (pair.dst / "a").stat().st_mode & 0o777 == 0o640


def test_a_file_still_hard_linked_is_still_skipped(pair: Pair) -> None:
    a, b = _sent_then_linked(pair)
    os.link(a, pair.src / "c")
    pair.event("created", pair.src / "c")
    b.write_text("v2")
    pair.event("modified", b)
    pair.drain()
    b.unlink()
    pair.event("deleted", b)  # `a` and `c` are still one file with two names
    pair.event("attrib", a)
    pair.drain()
    assert sorted(os.listdir(pair.dst)) == ["a"]
    assert (pair.dst / "a").read_text() == "v1"


def test_the_skipped_links_are_bounded() -> None:
    links = SkippedLinks(max_paths=2)
    links.add("/s/a", 7)
    links.add("/s/b", 7)
    links.add("/s/a", 7)  # again: the newest now
    links.add("/s/c", 8)
    assert len(links) == 2 and links.ino_of("/s/b") is None
    assert links.names(7) == ["/s/a"] and links.names(8) == ["/s/c"]
    links.discard("/s/a")
    links.discard("/s/a")
    assert links.names(7) == [] and links.ino_of("/s/c") == 8


def test_a_file_linked_again_after_it_was_sent_is_reported_again(pair: Pair) -> None:
    a, b = _sent_then_linked(pair)  # `b` reported
    pair.event("modified", b)  # still two names: not reported twice
    pair.drain()
    assert _hardlink_events(pair) == ["b"]
    a.unlink()
    pair.event("deleted", a)
    pair.drain()
    assert (pair.dst / "b").read_text() == "v1"  # one name left: sent
    os.link(b, pair.src / "c")
    pair.event("created", pair.src / "c")
    pair.event("modified", b)
    pair.drain()
    assert _hardlink_events(pair) == ["b", "b", "c"]  # hard-linked again: reported again


def test_the_paths_reported_as_hard_linked_are_bounded(pair: Pair) -> None:
    links = pair.conn._skipped_links
    links.max_paths = 2
    for n in range(4):
        f = pair.src / f"f{n}"
        write(f, "x")
        os.link(f, pair.src / f"g{n}")
        pair.event("created", f)
    pair.drain()
    assert _hardlink_events(pair) == ["f0", "f1", "f2", "f3"]
    remembered = [n for n in range(4) if links.ino_of(str(pair.src / f"f{n}")) is not None]
    assert remembered == [2, 3] and len(links) == 2

"""FILES ops and items: a mirror's small files, a directory slice at a time.

The wire form and its expansion into FILE_END ops (dtake.protocol.opwire), crafted
FILES ops against the target root, the queue's FILES items (renames, deletes, cost,
disk), the source's walk and sender with and without read-ahead
(dtake.service.smallfiles), and the sequence numbers a FILES op takes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dtake.config import QueueConfig
from dtake.ops import Op, OpKind
from dtake.protocol.framing import FrameStats
from dtake.protocol.opwire import decode_ops, encode_ops, expand_files, ops_from_wire
from dtake.service.apply import ConfinementError, TargetTree
from dtake.service.diskqueue import DiskJournal
from dtake.service.queue import LazyKind, SourceQueue
from dtake.service.smallfiles import FILES_OP_FILES, Prefetch, read_files
from dtake.service.source import FILES_FILE_MAX
from dtake.testing import tree_diff
from tests.unit.source_support import Pair, write

K = OpKind


def files_op(path: str, files: dict[str, bytes], *, seq: int = 1, **tags: Any) -> Op:
    entries = [
        [n, len(d), 0o640, os.getuid(), os.getgid(), 1_000_000_007] for n, d in files.items()
    ]
    return Op(K.FILES, path, seq, data=b"".join(files.values()), tags={"files": entries, **tags})


# ---------------------------------------------------------------------------- the wire
def test_a_files_op_stands_for_whole_file_ops_one_seq_each() -> None:
    op = files_op("d/e", {"a": b"aaa", "b": b"", "c": b"cccc"}, seq=10, qo=7, ak=1)
    out = expand_files(op)
    assert [(o.kind, o.path, o.seq, bytes(o.data), o.size) for o in out] == [
        (K.FILE_END, "d/e/a", 10, b"aaa", 3),
        (K.FILE_END, "d/e/b", 11, b"", 0),
        (K.FILE_END, "d/e/c", 12, b"cccc", 4),
    ]
    assert all((o.mode, o.mtime_ns, o.uid) == (0o640, 1_000_000_007, os.getuid()) for o in out)
    # the queue position on the first, the early-ACK request on the last
    assert [o.tags for o in out] == [{"whole": 1, "qo": 7}, {"whole": 1}, {"whole": 1, "ak": 1}]
    assert op.span() == 3
    # the set's base directory itself
    assert [o.path for o in expand_files(files_op("", {"x": b"1"}))] == ["x"]


def test_files_ops_cross_the_wire_expanded_in_order() -> None:
    ops = [
        Op(K.MKDIR, "d", 1, mode=0o755),
        files_op("d", {"a": b"A" * 5000, "b": b"B"}, seq=2),
        Op(K.DELETE, "old", 4),
    ]
    parts = encode_ops(ops)
    got = ops_from_wire(decode_ops(b"".join(bytes(p) for p in parts)))
    assert [(o.kind, o.path, o.seq) for o in got] == [
        (K.MKDIR, "d", 1),
        (K.FILE_END, "d/a", 2),
        (K.FILE_END, "d/b", 3),
        (K.DELETE, "old", 4),
    ]
    assert bytes(got[1].data) == b"A" * 5000 and bytes(got[2].data) == b"B"


BAD_ENTRIES: list[Any] = [
    None,
    [],
    [["", 1, 0o644, 0, 0, 1]],
    [[".", 1, 0o644, 0, 0, 1]],
    [["..", 1, 0o644, 0, 0, 1]],
    [["a/b", 1, 0o644, 0, 0, 1]],
    [["../x", 1, 0o644, 0, 0, 1]],
    [["a\0b", 1, 0o644, 0, 0, 1]],
    [["a", -1, 0o644, 0, 0, 1]],
    [["a", "1", 0o644, 0, 0, 1]],
    [["a", 1, None, 0, 0, 1]],
    [["a", 1, 0o644, 0, 0]],  # five fields
    [["a", 2, 0o644, 0, 0, 1]],  # more than the data
    [["a", 0, 0o644, 0, 0, 1]],  # less than the data
    ["a"],
]


@pytest.mark.parametrize("entries", BAD_ENTRIES)
def test_a_malformed_files_op_is_refused_whole(entries: Any) -> None:
    op = Op(K.FILES, "d", 5, data=b"X", tags={"files": entries})
    with pytest.raises(ValueError):
        expand_files(op)
    with pytest.raises(ValueError):  # and so is the frame that carries it
        ops_from_wire(decode_ops(b"".join(bytes(p) for p in encode_ops([op]))))


# ------------------------------------------------------------------------- confinement
@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def tree(root: Path) -> Iterator[TargetTree]:
    t = TargetTree(str(root))
    yield t
    t.close()


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    s = tmp_path / "sentinel"
    (s / "sub").mkdir(parents=True)
    (s / "passwd").write_bytes(b"root:x:0:0\n")
    return s


def _snapshot(path: Path) -> dict[str, Any]:
    return {
        str(p): (os.lstat(p).st_mode, os.lstat(p).st_mtime_ns, p.read_bytes() if p.is_file() else 0)
        for p in [path, *sorted(path.rglob("*"))]
    }


@pytest.mark.parametrize(
    "bad", ["..", "../..", "a/../..", "/etc", "a/./b", "./a", "a//b", "a/", "a\0b", "."]
)
def test_a_crafted_files_directory_writes_nothing_outside(
    tree: TargetTree, sentinel: Path, bad: str
) -> None:
    before = _snapshot(sentinel)
    for op in expand_files(files_op(bad, {"passwd": b"PWNED", "x": b"PWNED"})):
        with pytest.raises(ConfinementError):
            tree.apply(op)
    assert _snapshot(sentinel) == before
    assert not os.path.exists("/etc/x") or Path("/etc/x").read_bytes() != b"PWNED"


def test_files_through_a_symlinked_directory_or_onto_a_symlink(
    root: Path, tree: TargetTree, sentinel: Path
) -> None:
    os.symlink(sentinel, root / "esc")
    os.symlink(sentinel / "passwd", root / "lnk")
    before = _snapshot(sentinel)
    for op in expand_files(files_op("esc", {"passwd": b"PWNED"})):
        with pytest.raises(ConfinementError):
            tree.apply(op)
    for op in expand_files(files_op("", {"lnk": b"mine"})):
        tree.apply(op)  # replaces the link itself, never writes through it
    assert _snapshot(sentinel) == before
    assert not (root / "lnk").is_symlink() and (root / "lnk").read_bytes() == b"mine"


# ------------------------------------------------------------------------------ queue
def _queue(tmp_path: Path, *, budget_mb: int = 16, disk: bool = False) -> SourceQueue:
    folder = tmp_path / "q"
    folder.mkdir(exist_ok=True)
    cfg = QueueConfig(
        memory_max_mb=budget_mb,
        disk_folder=str(folder),
        disk_max_mb=None if disk else 0,
        disk_free_min_mb=0,
    )
    return SourceQueue.for_connection(cfg, "h", 1, 1, "uuid")


def _drain(q: SourceQueue) -> list[tuple[str, str, list[str]]]:
    out = []
    while (item := q.get(timeout=0)) is not None:
        if item.op is not None:
            out.append((item.op.kind.name, item.op.path, []))
        else:
            out.append((str(item.lazy), item.path, list(item.meta.get("names") or [])))
    return out


def test_a_files_item_moves_with_its_directory_and_is_cancelled_with_it(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    q.put_files("/s/a/d", ["f1", "f2"], mode="full", data_bytes=10)
    q.put_files("/s/a/d", ["f3"], mode="full", data_bytes=5)  # never merged with the first
    q.put_files("/s/x", ["g"], mode="full")
    q.put_rename("/s/a", "/s/b", Op(K.RENAME, "a", new_path="b"))  # an ancestor
    q.put_rename("/s/x/g", "/s/x/h", Op(K.RENAME, "x/g", new_path="x/h"))  # one file in it
    assert _drain(q) == [
        ("files", "/s/x", ["g"]),  # left alone: the sender finds g gone (vanished.py)
        ("RENAME", "a", []),
        ("files", "/s/b/d", ["f1", "f2"]),
        ("files", "/s/b/d", ["f3"]),
        ("RENAME", "x/g", []),
    ]
    assert q.bytes == 0
    q.put_files("/s/b/d", ["f1"], mode="full")
    q.put_files("/s/bd", ["f1"], mode="full")  # a sibling whose name starts alike
    q.put_delete("/s/b", Op(K.DELETE, "b"))
    assert _drain(q) == [("files", "/s/bd", ["f1"]), ("DELETE", "b", [])]
    q.close()


def test_a_files_item_costs_its_names_and_data(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    q.put_files("/s/d", ["a"], mode="full", data_bytes=0)
    one = q.bytes
    q.put_files("/s/d", ["a", "bbbb"], mode="full", data_bytes=100_000)
    assert q.bytes - one > 100_000 + len("abbbb")
    _drain(q)
    assert q.bytes == 0
    q.close()


def test_a_files_item_spilled_to_disk_comes_back_without_read_ahead(tmp_path: Path) -> None:
    q = _queue(tmp_path, budget_mb=1, disk=True)
    assert q.journal is not None and isinstance(q.journal, DiskJournal)
    held = []
    for i in range(40):  # ~64 KiB of data each: the memory budget is soon full
        ok, in_memory, moved = q.put_files(
            f"/s/d{i}", [f"f{i}"], mode="full", data_bytes=64 << 10, prefetch=Prefetch()
        )
        assert ok and not moved
        held.append(in_memory)
    assert held[0] and not held[-1] and q.spilled
    items = []
    while (item := q.get(timeout=0)) is not None:
        items.append(item)
    assert [(i.lazy, i.path, i.meta["names"]) for i in items] == [
        (LazyKind.FILES, f"/s/d{i}", [f"f{i}"]) for i in range(40)
    ]
    back = [i for i in items if i.from_disk]
    assert back and all(i.prefetch is None and i.meta["bytes"] == 64 << 10 for i in back)
    q.close()


# ----------------------------------------------------------------------------- source
@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path, disk_queue=False, files=True)
    yield p
    p.close()


def _walk(pair: Pair, mode: str = "full") -> None:
    conn = pair.conn
    conn.queue.put_lazy(LazyKind.MKDIR, str(pair.src), mode="full")
    total = 0
    for chunk in conn._walk_dirs(str(pair.src)):
        done = conn._queue_walked(chunk, mode, total, threading.Event())
        assert done is not None
        total = done[0]


def _files_sent(pair: Pair) -> list[tuple[str, list[str]]]:
    return [(op.path, [e[0] for e in op.tags["files"]]) for op in pair.sent if op.kind is K.FILES]


def _mixed_tree(src: Path) -> None:
    for i in range(3):
        write(src / "d" / f"f{i}", f"small {i}")
    (src / "d" / "empty").write_bytes(b"")
    (src / "d" / "big").write_bytes(os.urandom(FILES_FILE_MAX + 1))
    with open(src / "d" / "sparse", "wb") as fh:
        fh.truncate(8192)  # all hole: the per-file way keeps it sparse
    write(src / "d" / "linked", "two names")
    os.link(src / "d" / "linked", src / "d" / "linked2")
    os.symlink("f0", src / "d" / "link")
    os.mkfifo(src / "d" / "fifo")
    write(src / "top", "at the base")
    os.chmod(src / "d" / "f1", 0o600)


def test_a_mirror_sends_small_files_as_files_ops_and_the_rest_as_before(pair: Pair) -> None:
    _mixed_tree(pair.src)
    _walk(pair)
    while (item := pair.conn.queue.get(timeout=0)) is not None:
        pair.conn._process(item)
    assert sorted(_files_sent(pair)) == [("", ["top"]), ("d", ["empty", "f0", "f1", "f2"])]
    per_file = sorted(op.path for op in pair.sent if op.kind in (K.FILE_BEGIN, K.FILE_END))
    assert per_file == ["d/big", "d/sparse", "d/sparse"]  # one op; begin and end
    pair.apply_sent()
    os.unlink(pair.src / "d" / "fifo")  # (not sent; the comparison would open it)
    assert tree_diff(str(pair.src), str(pair.dst)) == [
        "only in source: d/linked",  # hard links: reported (4099), not sent
        "only in source: d/linked2",
    ]
    assert os.stat(pair.dst / "d" / "sparse").st_blocks == 0
    assert sorted(kw["path"] for eid, kw in pair.events.emitted if eid == 4099) == [
        str(pair.src / "d" / "linked"),
        str(pair.src / "d" / "linked2"),
    ]
    assert pair.conn.stats["files_sent"] == 7  # five small, big, sparse


def test_the_walk_reads_ahead_after_queueing_and_a_later_change_wins(pair: Pair) -> None:
    write(pair.src / "a", "v1")
    write(pair.src / "b", "v1")
    _walk(pair)
    items = list(pair.conn.queue._items)
    files = [i for i in items if i.lazy == LazyKind.FILES]
    assert len(files) == 1 and files[0].prefetch is not None
    assert files[0].prefetch.state == Prefetch.READY  # read by the walk, after queueing
    # A change after the read has its own item behind the FILES item: it wins.
    write(pair.src / "a", "v2")
    pair.event("modified", pair.src / "a")
    pair.drain()
    assert (pair.dst / "a").read_text() == "v2" and (pair.dst / "b").read_text() == "v1"


@pytest.mark.parametrize("kind", ["modified", "attrib"])
def test_a_change_merged_into_an_item_waiting_before_the_read_ahead_is_not_lost(
    pair: Pair, kind: str
) -> None:
    """A file with a CONTENT or ATTRS item waiting when the walk queues its directory
    goes one by one: a later change is merged into that waiting item, in front of the
    FILES item, whose read-ahead data would otherwise land last and stale."""
    write(pair.src / "p", "v1")
    write(pair.src / "q", "q")
    pair.event(kind, pair.src / "p")  # waiting in the queue before the walk
    _walk(pair)  # queues the FILES item and reads it ahead
    if kind == "modified":
        write(pair.src / "p", "v2, later")
    else:
        os.chmod(pair.src / "p", 0o600)  # (a mode is data too)
    pair.event(kind, pair.src / "p")  # merged into the waiting item (dedup)
    pair.drain()
    assert tree_diff(str(pair.src), str(pair.dst)) == []


def test_without_the_feature_the_sender_goes_file_by_file(pair: Pair) -> None:
    for i in range(3):
        write(pair.src / f"f{i}", "x")
    pair.conn._peer_files = False  # a target of an older version
    _walk(pair)
    assert [i.prefetch for i in pair.conn.queue._items if i.lazy == LazyKind.FILES] == [None]
    while (item := pair.conn.queue.get(timeout=0)) is not None:
        pair.conn._process(item)
    assert not _files_sent(pair)
    assert sorted(op.path for op in pair.sent if op.kind is K.FILE_END) == ["f0", "f1", "f2"]
    pair.apply_sent()
    assert tree_diff(str(pair.src), str(pair.dst)) == []


def test_files_gone_grown_or_replaced_before_they_are_read(pair: Pair) -> None:
    for name in ("moved", "gone", "grown", "dir", "same"):
        write(pair.src / "d" / name, name)
    pair.conn._peer_files = False  # no read-ahead: the sender reads, after these
    _walk(pair)
    pair.conn._peer_files = True
    os.rename(pair.src / "d" / "moved", pair.src / "d" / "moved2")
    os.unlink(pair.src / "d" / "gone")
    (pair.src / "d" / "grown").write_bytes(b"G" * (FILES_FILE_MAX + 10))
    os.unlink(pair.src / "d" / "dir")
    (pair.src / "d" / "dir").mkdir()
    pair.event("moved", pair.src / "d" / "moved", dest=pair.src / "d" / "moved2")
    pair.event("deleted", pair.src / "d" / "gone")
    while (item := pair.conn.queue.get(timeout=0)) is not None:
        pair.conn._process(item)
    assert _files_sent(pair) == [("d", ["same"])]  # the others went their own ways
    pair.apply_sent()
    assert (pair.dst / "d" / "moved2").read_text() == "moved"  # sent after its RENAME
    assert not (pair.dst / "d" / "gone").exists()
    assert (pair.dst / "d" / "grown").read_bytes() == b"G" * (FILES_FILE_MAX + 10)  # whole
    assert (pair.dst / "d" / "dir").is_dir()  # the per-file way sends a directory's MKDIR
    assert (pair.dst / "d" / "same").read_text() == "same"
    assert pair.conn.stats["vanished_resent"] == 1
    assert not pair.conn._vanished.under(str(pair.src))


def test_a_files_items_directory_gone_before_it_is_read(pair: Pair) -> None:
    write(pair.src / "d" / "a", "a")
    write(pair.src / "d" / "b", "b")
    pair.conn._peer_files = False
    _walk(pair)
    pair.conn._peer_files = True
    os.rename(pair.src / "d", pair.src / "e")
    pair.event("moved", pair.src / "d", is_dir=True, dest=pair.src / "e")
    pair.drain()
    assert sorted(os.listdir(pair.dst / "e")) == ["a", "b"]
    assert not (pair.dst / "d").exists()


def test_read_files_batches_and_checks(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    names = [f"f{i:04}" for i in range(FILES_OP_FILES + 3)]
    for n in names:
        (d / n).write_bytes(b"z" * 10)
    (d / "fifo").touch()
    os.unlink(d / "fifo")
    os.mkfifo(d / "fifo")
    got = read_files(str(d), [*names, "fifo", "nothere"], 1024, 1 << 20)
    assert [len(b[0]) for b in got.batches] == [FILES_OP_FILES, 3]
    assert got.rest == ["fifo"] and got.vanished == ["nothere"]
    assert all(len(data) == 10 * len(entries) for entries, data, _ in got.batches)
    by_bytes = read_files(str(d), names[:10], 1024, 25)  # an op closes at 25 bytes
    assert [len(b[0]) for b in by_bytes.batches] == [3, 3, 3, 1]
    gone = read_files(str(tmp_path / "nope"), ["a"], 1024, 1 << 20)
    assert gone.dir_gone and gone.vanished == ["a"] and not gone.batches


def test_the_read_ahead_trusts_the_walks_sizes_only_as_far_as_the_descriptor_agrees(
    tmp_path: Path,
) -> None:
    d = tmp_path / "d"
    d.mkdir()
    names = ["same", "grew", "shrank", "fifo", "link", "linked", "gone", "empty"]
    for n in names:
        (d / n).write_bytes(b"1234")
    listed = [4] * len(names)
    (d / "empty").write_bytes(b"")
    listed[-1] = 0
    (d / "grew").write_bytes(b"123456")
    (d / "shrank").write_bytes(b"12")
    os.unlink(d / "fifo")
    os.mkfifo(d / "fifo")  # replaced since the walk: never read (no hang either)
    os.unlink(d / "link")
    os.symlink("same", d / "link")  # O_NOFOLLOW
    os.link(d / "linked", tmp_path / "second-name")
    os.unlink(d / "gone")
    got = read_files(str(d), names, 1024, 1 << 20, listed)
    assert [e[0] for e in got.batches[0][0]] == ["same", "empty"]
    assert bytes(got.batches[0][1]) == b"1234"
    assert sorted(got.rest) == ["fifo", "grew", "link", "linked", "shrank"]
    assert got.vanished == ["gone"]


def test_the_sender_waits_for_a_read_in_progress(pair: Pair) -> None:
    write(pair.src / "a", "aaa")
    pair.conn._peer_files = False
    _walk(pair)
    pair.conn._peer_files = True
    items = [i for i in pair.conn.queue._items if i.lazy == LazyKind.FILES]
    pf = items[0].prefetch = Prefetch()
    cond = pair.conn._prefetch_cond
    assert pf.start(cond)  # the walk is reading
    sent: list[int] = []
    t = threading.Thread(target=lambda: (pair.drain(), sent.append(1)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not sent  # waits for the read in progress
    os.unlink(pair.src / "a")  # what the walk read stands: it was read in place
    result = read_files(str(pair.src), [], 1024, 1 << 20)
    result.batches.append(([["a", 3, 0o644, os.getuid(), os.getgid(), 1]], b"aaa", [1]))
    pf.done(cond, result)
    t.join(5)
    assert sent and (pair.dst / "a").read_bytes() == b"aaa"
    assert not pf.start(cond)  # taken: the walk leaves it alone


# ------------------------------------------------------------------ sequence numbers
class _FS:
    def __init__(self) -> None:
        self.frames: list[list[Op]] = []

    def send_parts(self, mtype: Any, parts: list[Any], compress: Any = None) -> int:
        self.frames.append(ops_from_wire(decode_ops(b"".join(bytes(p) for p in parts))))
        return sum(map(len, parts))

    def stats(self) -> FrameStats:
        return FrameStats()


def test_a_files_op_takes_one_sequence_number_per_file(tmp_path: Path) -> None:
    pair = Pair(tmp_path, disk_queue=False, files=True)
    conn = pair.conn
    del conn._emit  # the real one
    fs = conn._fs = _FS()
    conn._emit(Op(K.MKDIR, "d", mode=0o755))
    conn._emit(files_op("d", {"a": b"1", "b": b"2", "c": b"3"}))
    conn._emit(Op(K.DELETE, "x"))
    conn._flush_batch()
    assert conn.next_seq == 6
    assert [(s, op.kind) for s, op in conn._inflight] == [
        (1, K.MKDIR),
        (4, K.FILES),  # keyed by its last sequence number
        (5, K.DELETE),
    ]
    assert [(o.seq, o.path) for o in fs.frames[0]] == [
        (1, "d"),
        (2, "d/a"),
        (3, "d/b"),
        (4, "d/c"),
        (5, "x"),
    ]
    assert conn.stats["ops_sent"] == 5
    conn._on_ack(3, [])  # part of the FILES op applied: it stays in flight
    assert [s for s, _ in conn._inflight] == [4, 5]
    conn._on_ack(4, [])
    assert [s for s, _ in conn._inflight] == [5]
    conn._fs = None
    pair.close()

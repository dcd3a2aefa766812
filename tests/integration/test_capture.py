"""InotifyCapture against real inotify on tmp_path (dtake/capture/inotify.py).

No sleeps: after the actions under test each test creates a sentinel file and reads until
its CREATED event arrives. Since events come in kernel order, everything the actions
caused is then in hand. Every wait is bounded.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dtake.capture import EventKind, FsEvent, InotifyCapture

K = EventKind
MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")
WAIT = 10.0  # s, upper bound for any expected event


def read_until(
    cap: InotifyCapture,
    done: Callable[[list[FsEvent]], bool],
    timeout: float = WAIT,
    *,
    keep_sentinels: bool = False,
) -> list[FsEvent]:
    """Read until ``done(events)``; sentinel events (see settle) are left out unless
    asked for."""
    events: list[FsEvent] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; got {events}")
        batch = cap.read(timeout=min(left, 0.5))
        events.extend(e for e in batch if keep_sentinels or "/.sentinel-" not in e.path)
    return events


_seq = iter(range(1_000_000))


def settle(cap: InotifyCapture, where: Path) -> list[FsEvent]:
    """Read everything caused so far: create a sentinel and read until it shows up.
    Returns the events before it; sentinel events (of this and earlier calls) are
    dropped, and the sentinel is removed so it does not get in the way of the test."""
    sentinel = str(where / f".sentinel-{next(_seq)}")
    os.close(os.open(sentinel, os.O_CREAT | os.O_WRONLY))
    events = read_until(
        cap,
        lambda ev: any(e.kind is K.CLOSED_WRITE and e.path == sentinel for e in ev),
        keep_sentinels=True,
    )
    os.unlink(sentinel)
    return [e for e in events if "/.sentinel-" not in e.path]


@pytest.fixture
def cap() -> Iterator[InotifyCapture]:
    c = InotifyCapture()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def root(tmp_path: Path, cap: InotifyCapture) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    cap.add_root(str(r))
    return r


def write(path: Path, data: bytes = b"x") -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --- ordering --------------------------------------------------------------------------


def test_create_write_rename_delete_in_kernel_order(cap: InotifyCapture, root: Path) -> None:
    f, g = root / "f", root / "g"
    write(f)
    os.rename(f, g)
    fd = os.open(g, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"more")
    os.close(fd)
    os.unlink(g)
    assert settle(cap, root) == [
        FsEvent(K.CREATED, str(f)),
        FsEvent(K.MODIFIED, str(f)),
        FsEvent(K.CLOSED_WRITE, str(f)),
        FsEvent(K.MOVED, str(f), dest=str(g)),
        FsEvent(K.MODIFIED, str(g)),
        FsEvent(K.CLOSED_WRITE, str(g)),
        FsEvent(K.DELETED, str(g)),
    ]


def test_delete_then_recreate_keeps_order(cap: InotifyCapture, root: Path) -> None:
    """watchfiles returns the same set for create+delete and delete+create; we do not."""
    a = root / "a"
    write(a, b"")
    os.unlink(a)
    os.close(os.open(a, os.O_CREAT | os.O_WRONLY))
    kinds = [(e.kind, e.path) for e in settle(cap, root)]
    assert kinds == [
        (K.CREATED, str(a)),
        (K.CLOSED_WRITE, str(a)),
        (K.DELETED, str(a)),
        (K.CREATED, str(a)),
        (K.CLOSED_WRITE, str(a)),
    ]


def test_attrib_and_repeated_writes_are_not_coalesced(cap: InotifyCapture, root: Path) -> None:
    f = root / "f"
    write(f)
    settle(cap, root)
    os.chmod(f, 0o600)
    fd = os.open(f, os.O_WRONLY)
    os.write(fd, b"1")
    os.chmod(f, 0o640)
    os.write(fd, b"2")
    os.close(fd)
    got = [e.kind for e in settle(cap, root)]
    assert got == [K.ATTRIB, K.MODIFIED, K.ATTRIB, K.MODIFIED, K.CLOSED_WRITE]


def test_many_renames_are_all_paired(cap: InotifyCapture, root: Path) -> None:
    for i in range(300):
        write(root / f"r{i}")
    settle(cap, root)
    for i in range(300):
        os.rename(root / f"r{i}", root / f"s{i}")
    got = settle(cap, root)
    assert got == [
        FsEvent(K.MOVED, str(root / f"r{i}"), dest=str(root / f"s{i}")) for i in range(300)
    ]


def test_rename_pair_split_across_reads_is_still_paired(
    cap: InotifyCapture, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With reads of one 32-byte event each, MOVED_FROM ends a read and MOVED_TO comes
    in the next: read() must look again instead of reporting DELETED + CREATED."""
    import dtake.capture.inotify as mod

    write(root / "a")
    settle(cap, root)
    monkeypatch.setattr(mod, "_READ_CHUNK", 32)  # header 16 + name "a\\0" padded to 16
    monkeypatch.setattr(mod, "_READ_MAX", 32)
    os.rename(root / "a", root / "b")
    events = read_until(cap, lambda ev: len(ev) >= 1)
    assert events == [FsEvent(K.MOVED, str(root / "a"), dest=str(root / "b"))]


# --- new directories -------------------------------------------------------------------


def test_nested_mkdir_race_loses_nothing(cap: InotifyCapture, root: Path) -> None:
    """`mkdir -p a/b/c && echo x > a/b/c/f` fast: f must be reported even when it is
    written before the watch on a/b/c exists (synthetic events from the rescan)."""
    files = []
    for i in range(40):
        leaf = root / f"t{i}" / "b" / "c"
        os.makedirs(leaf)
        write(leaf / "f")
        files.append(str(leaf / "f"))
    events = settle(cap, root)
    seen = {e.path for e in events if e.kind in (K.CREATED, K.CLOSED_WRITE)}
    assert set(files) <= seen
    mkdirs = {e.path for e in events if e.kind is K.MKDIR}
    for i in range(40):
        t = root / f"t{i}"
        assert {str(t), str(t / "b"), str(t / "b" / "c")} <= mkdirs
        # An ancestor's MKDIR precedes its children's events.
        first = {e.path: n for n, e in reversed(list(enumerate(events)))}
        assert first[str(t)] < first[str(t / "b")] < first[str(t / "b" / "c" / "f")]
    # The new directories are really watched: a later write is a kernel event.
    write(root / "t0" / "b" / "c" / "g")
    assert FsEvent(K.CREATED, str(root / "t0" / "b" / "c" / "g")) in settle(cap, root)
    assert cap.watch_count == 1 + 3 * 40


def test_dir_rename_then_write_beneath_new_name(cap: InotifyCapture, root: Path) -> None:
    os.makedirs(root / "d" / "sub" / "deep")
    settle(cap, root)
    os.rename(root / "d", root / "e")
    write(root / "e" / "sub" / "deep" / "x")
    events = settle(cap, root)
    assert events[0] == FsEvent(K.MOVED, str(root / "d"), True, str(root / "e"))
    assert FsEvent(K.CREATED, str(root / "e" / "sub" / "deep" / "x")) in events
    assert not [e for e in events if "/d/" in e.path]


def test_dir_created_and_renamed_before_read_is_watched(cap: InotifyCapture, root: Path) -> None:
    """mkdir -p a/b/c, write, rename a -> A, all before the capture reads: watching ``a``
    fails (gone), so the rename must watch ``A`` and everything below it; later changes
    under the new name are reported (they were lost: a flaky replication test)."""
    os.makedirs(root / "a" / "b" / "c")
    write(root / "a" / "b" / "c" / "deep")
    os.rename(root / "a", root / "A")
    events = settle(cap, root)
    assert FsEvent(K.MOVED, str(root / "a"), True, str(root / "A")) in events
    assert str(root / "A" / "b" / "c" / "deep") in {e.path for e in events}
    write(root / "A" / "b" / "after")
    os.chmod(root / "A" / "b", 0o700)
    os.utime(root / "A" / "b" / "c" / "deep", ns=(1, 1))
    later = settle(cap, root)
    assert FsEvent(K.CREATED, str(root / "A" / "b" / "after")) in later
    assert FsEvent(K.ATTRIB, str(root / "A" / "b"), True) in later
    assert FsEvent(K.ATTRIB, str(root / "A" / "b" / "c" / "deep")) in later
    assert cap.watch_count == 4


def test_move_out_and_in(cap: InotifyCapture, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write(root / "f")
    (root / "E").mkdir()
    (root / "E" / "inner").mkdir()
    write(outside / "g")
    (outside / "D" / "s").mkdir(parents=True)
    write(outside / "D" / "x")
    write(outside / "D" / "s" / "y")
    settle(cap, root)
    watches = cap.watch_count

    os.rename(root / "f", outside / "f")  # file out -> DELETED
    os.rename(outside / "g", root / "g")  # file in -> CREATED
    os.rename(root / "E", outside / "E")  # dir out -> DELETED, watches dropped
    os.rename(outside / "D", root / "D")  # dir in -> MKDIR + its contents
    events = settle(cap, root)
    assert events[:4] == [
        FsEvent(K.DELETED, str(root / "f")),
        FsEvent(K.CREATED, str(root / "g")),
        FsEvent(K.DELETED, str(root / "E"), True),
        FsEvent(K.MKDIR, str(root / "D"), True),
    ]
    assert set(events[4:]) == {
        FsEvent(K.CREATED, str(root / "D" / "x"), synthetic=True),
        FsEvent(K.MKDIR, str(root / "D" / "s"), True, synthetic=True),
        FsEvent(K.CREATED, str(root / "D" / "s" / "y"), synthetic=True),
    }
    assert cap.watch_count == watches - 2 + 2
    # The moved-out tree is no longer reported (under any name); the moved-in one is.
    write(outside / "E" / "inner" / "q")
    write(root / "D" / "s" / "z")
    events = settle(cap, root)
    assert events == [
        FsEvent(K.CREATED, str(root / "D" / "s" / "z")),
        FsEvent(K.MODIFIED, str(root / "D" / "s" / "z")),
        FsEvent(K.CLOSED_WRITE, str(root / "D" / "s" / "z")),
    ]


def test_symlinks_and_hard_links(cap: InotifyCapture, root: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (target / "sub").mkdir(parents=True)
    write(root / "f")
    settle(cap, root)
    watches = cap.watch_count
    os.symlink(target, root / "link")
    os.link(root / "f", root / "hard")
    events = settle(cap, root)
    assert events == [
        FsEvent(K.CREATED, str(root / "link")),
        FsEvent(K.CREATED, str(root / "hard")),
    ]
    assert cap.watch_count == watches  # the symlinked directory is not followed
    write(target / "sub" / "nope")
    assert settle(cap, root) == []


def test_add_root_does_not_follow_symlinks(cap: InotifyCapture, tmp_path: Path) -> None:
    (tmp_path / "elsewhere" / "a").mkdir(parents=True)
    r = tmp_path / "r"
    (r / "real").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", r / "link")
    cap.add_root(str(r))
    assert cap.watch_count == 2


def test_prune_keeps_subtree_unwatched(tmp_path: Path) -> None:
    r = tmp_path / "r"
    (r / "skip" / "old").mkdir(parents=True)
    with InotifyCapture(prune=lambda p: os.path.basename(p) == "skip") as cap:
        cap.add_root(str(r))
        assert cap.watch_count == 1
        write(r / "skip" / "x")
        (r / "b" / "skip").mkdir(parents=True)
        write(r / "b" / "skip" / "y")
        events = settle(cap, r)
        # Reported by the kernel or by the rescan of b, depending on the race.
        assert (K.MKDIR, str(r / "b" / "skip")) in [(e.kind, e.path) for e in events]
        assert not [e for e in events if "/skip/" in e.path]


# --- roots -----------------------------------------------------------------------------


def test_add_root_errors_and_idempotence(cap: InotifyCapture, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cap.add_root(str(tmp_path / "missing"))
    write(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        cap.add_root(str(tmp_path / "file"))
    (tmp_path / "r" / "a" / "b").mkdir(parents=True)
    cap.add_root(str(tmp_path / "r"))
    assert cap.watch_count == 3
    cap.add_root(str(tmp_path / "r"))
    cap.add_root(str(tmp_path / "r" / "a"))
    assert cap.watch_count == 3
    assert cap.roots == {str(tmp_path / "r")}
    assert cap.read() == []


def test_remove_root_stops_events(cap: InotifyCapture, tmp_path: Path) -> None:
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    (r1 / "sub").mkdir(parents=True)
    r2.mkdir()
    cap.add_root(str(r1))
    cap.add_root(str(r2))
    cap.remove_root(str(r1))
    assert cap.watch_count == 1
    write(r1 / "sub" / "x")
    write(r1 / "y")
    assert settle(cap, r2) == []


def test_root_deleted_is_reported(cap: InotifyCapture, root: Path) -> None:
    (root / "sub").mkdir()
    settle(cap, root)
    os.rmdir(root / "sub")
    os.rmdir(root)
    events = read_until(cap, lambda ev: FsEvent(K.DELETED, str(root), True) in ev)
    assert events[0] == FsEvent(K.DELETED, str(root / "sub"), True)
    assert cap.watch_count == 0


# --- never silent ----------------------------------------------------------------------


@pytest.fixture
def small_queue_capture() -> Iterator[InotifyCapture]:
    """A capture whose inotify instance has max_queued_events=32.

    The limit is read when an instance is created, so it is lowered only around the
    constructor and restored at once (other processes on the machine share the knob)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change fs.inotify.max_queued_events")
    original = MAX_QUEUED.read_text()
    try:
        MAX_QUEUED.write_text("32\n")
        c = InotifyCapture()
    finally:
        MAX_QUEUED.write_text(original)
    assert MAX_QUEUED.read_text() == original
    try:
        yield c
    finally:
        c.close()


def test_queue_overflow_is_reported(small_queue_capture: InotifyCapture, tmp_path: Path) -> None:
    cap = small_queue_capture
    cap.add_root(str(tmp_path))
    for i in range(200):  # ~600 events without reading
        write(tmp_path / f"f{i}")
    events = read_until(cap, lambda ev: any(e.kind is K.OVERFLOW for e in ev))
    overflow = [e for e in events if e.kind is K.OVERFLOW]
    assert overflow == [FsEvent(K.OVERFLOW, "")]
    assert len(events) <= 33
    assert events[0] == FsEvent(K.CREATED, str(tmp_path / "f0"))  # order kept up to the gap


def test_watch_limit_is_reported(
    cap: InotifyCapture,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def full(path: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(cap, "_add_watch", full)
    caplog.set_level(logging.ERROR, logger="dtake.capture")
    (root / "new").mkdir()
    events = settle(cap, root)
    assert events == [
        FsEvent(K.MKDIR, str(root / "new"), True),
        FsEvent(K.OVERFLOW, str(root / "new"), True),
    ]
    assert "fs.inotify.max_user_watches" in caplog.text
    assert str(root / "new") in caplog.text


def test_watch_limit_during_add_root_is_reported(
    cap: InotifyCapture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "r" / "a").mkdir(parents=True)
    real = cap._add_watch

    def limited(path: str) -> int:
        if path.endswith("/a"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path)

    monkeypatch.setattr(cap, "_add_watch", limited)
    cap.add_root(str(tmp_path / "r"))
    assert cap.read() == [FsEvent(K.OVERFLOW, str(tmp_path / "r" / "a"), True)]

"""Change journal: after a clean disconnect, a differences resync replays what changed
instead of walking both trees, and falls back to the walk whenever the journal or the
target's detach token cannot be trusted. Two real services on loopback, real inotify;
every test ends with byte-for-byte equal trees (content, mode, owner, mtimes, also of
directories)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from dtake.testing import ServiceProcess
from tests.service_support import assert_same, settle, sh, small_inotify_queue, until

Factory = Callable[..., ServiceProcess]


def _tree(root: str, dirs: int = 6, files: int = 30) -> None:
    rnd = random.Random(3)
    for d in range(dirs):
        dp = os.path.join(root, f"d{d}")
        os.makedirs(os.path.join(dp, "sub"), exist_ok=True)
        for f in range(files):
            with open(os.path.join(dp, f"f{f:03}"), "wb") as fh:
                fh.write(rnd.randbytes(rnd.randrange(1, 5000)))
        with open(os.path.join(dp, "sub", "deep"), "wb") as fh:
            fh.write(rnd.randbytes(100))
    os.symlink("d0/f000", os.path.join(root, "link"))


def _connect(a: ServiceProcess, b: ServiceProcess, dst: str, **kw: Any) -> int:
    r = a.call(
        "connect",
        repset="rs",
        host="127.0.0.1",
        port=b.port,
        target_path=dst,
        mirror=kw.pop("mirror", "differences"),
        **kw,
    )
    return int(r["id"])


def _status(a: ServiceProcess, cid: int) -> dict[str, Any]:
    st: dict[str, Any] = next(c for c in a.call("status")["connections"] if c["id"] == cid)
    return st


def _mirrored(tmp_path: Any, service: Factory, **cfg: Any) -> tuple[str, str, Any, Any, int]:
    """Source tree, target path, services a (source) and b (target), the connection:
    fully mirrored and idle."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _tree(src)
    a, b = service("a", **cfg), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec", f"{src}/d5 exc, rec"])
    cid = _connect(a, b, dst, mirror="full")
    settle(a, cid)
    return src, dst, a, b, cid


def _setup(tmp_path: Any, service: Factory, **cfg: Any) -> tuple[str, str, Any, Any]:
    """``_mirrored``, then disconnected cleanly (a journal is kept)."""
    src, dst, a, b, cid = _mirrored(tmp_path, service, **cfg)
    _same(src, dst)
    _disconnect(a, cid)
    return src, dst, a, b


def _same(src: str, dst: str, *, dir_mtimes: bool = True) -> None:
    shutil.rmtree(os.path.join(src, "d5"), ignore_errors=True)  # excluded: not replicated
    assert_same(src, dst, dir_mtimes=dir_mtimes)


def _disconnect(a: ServiceProcess, cid: int) -> None:
    time.sleep(0.3)  # the last capture events of the mirror's own writes are read
    a.call("disconnect", con_id=cid)


def _resync(a: ServiceProcess, b: ServiceProcess, dst: str, **kw: Any) -> dict[str, Any]:
    time.sleep(0.3)  # the capture has read the changes
    cid = _connect(a, b, dst, **kw)
    return settle(a, cid)


def _write(path: str, data: bytes, mtime_s: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))


def _events(a: ServiceProcess, eid: int) -> list[dict[str, Any]]:
    return [e for e in a.call("events", limit=100000) if e["id"] == eid]


def test_journal_resync_replays_every_kind_of_change(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b = _setup(tmp_path, service)
    s = src
    _write(f"{s}/d0/new", b"created while disconnected\n")  # create
    with open(f"{s}/d0/f001", "r+b") as fh:  # write in place
        fh.write(b"XYZ")
    with open(f"{s}/d0/f002", "ab") as fh:  # append
        fh.write(b"appended" * 100)
    os.truncate(f"{s}/d0/f003", 7)  # truncate
    os.unlink(f"{s}/d0/f004")  # delete
    os.chmod(f"{s}/d0/f005", 0o600)  # attributes only
    os.utime(f"{s}/d0/f006", (1_000_000, 1_000_000))
    os.rename(f"{s}/d0/f007", f"{s}/d1/moved")  # rename of a file across directories
    os.rename(f"{s}/d2", f"{s}/d2-renamed")  # rename of a whole directory
    os.makedirs(f"{s}/newtree/a/b")  # a new subdirectory tree
    _write(f"{s}/newtree/a/b/leaf", b"leaf\n")
    _write(f"{s}/newtree/top", b"top\n")
    os.symlink("../d0/new", f"{s}/d1/newlink")  # symlinks: new, replaced, removed
    os.unlink(f"{s}/link")
    os.symlink("d1/f001", f"{s}/link")
    shutil.rmtree(f"{s}/d3")  # a deleted directory tree
    os.rename(f"{s}/d4/f000", f"{s}/d4/sub/f000")  # into a subdirectory
    _write(f"{s}/d5/excluded", b"excluded: never replicated\n")
    _write(f"{s}/d1/tmp", b"short-lived\n")  # created and deleted again
    os.unlink(f"{s}/d1/tmp")
    os.chmod(f"{s}/d1", 0o750)  # a directory's own attributes
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "journal", st["resync"]
    assert st["resync"]["paths"] > 0
    assert st["target_data_state"] == "OK" and st["mirror_status"] == "Idle"
    assert st["stats"]["mirror_files_skipped"] == 0  # nothing was walked
    assert not os.path.exists(f"{dst}/d5/excluded")
    _same(src, dst)
    assert _events(a, 51012)


def test_journal_resync_twice_in_a_row(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b = _setup(tmp_path, service)
    for i in range(2):
        kept = a.call("status")["journals"]
        assert [(j["repset"], j["target_path"], j["valid"]) for j in kept] == [("rs", dst, True)]
        assert b.call("status")["detach_tokens"] == 1
        _write(f"{src}/d{i}/round", f"round {i}\n".encode())
        st = _resync(a, b, dst)
        assert st["resync"]["method"] == "journal", st["resync"]
        assert a.call("status")["journals"] == [] and b.call("status")["detach_tokens"] == 0
        text = sh(sys.executable, "-m", "dtake.cli.main", "--socket", a.socket_path, "status")
        assert "last resync: journal" in text
        _same(src, dst)
        _disconnect(a, st["id"])


def test_change_on_the_target_refuses_the_token(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b = _setup(tmp_path, service)
    _write(f"{src}/d0/new", b"source change\n")
    # Changed on the target behind the service's back: the token is refused and the
    # walked mirror repairs the file (its size differs from the source's).
    with open(f"{dst}/d1/f000", "ab") as fh:
        fh.write(b"target-side change")
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "walk"
    assert "refused" in st["resync"]["reason"] and "changed" in st["resync"]["reason"]
    _same(src, dst)


@pytest.mark.parametrize(
    ("restarted", "why"),
    [("target", "no detach token"), ("source", "no clean disconnect")],
)
def test_a_service_restart_forgets_journal_and_token(
    tmp_path: Any, service: Factory, restarted: str, why: str
) -> None:
    """Journals and tokens live in memory: after a restart of either side, the walk."""
    src, dst, a, b = _setup(tmp_path, service)
    svc = a if restarted == "source" else b
    svc.stop()
    _write(f"{src}/d0/new", b"changed while a service was down\n")
    svc.start()
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "walk"
    assert why in st["resync"]["reason"]
    _same(src, dst)


def test_orphans_need_the_walk(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b = _setup(tmp_path, service)
    _write(f"{src}/d0/new", b"source change\n")
    _write(f"{dst}/d0/orphan", b"only on the target\n")
    st = _resync(a, b, dst, orphans="delete")
    assert st["resync"]["method"] == "walk"
    assert "orphan" in st["resync"]["reason"]
    until(lambda: not os.path.exists(f"{dst}/d0/orphan"), "orphan deleted")
    # Deleting the orphan moves d0's mtime on the target after the mirror set it (the
    # walked mirror's orphan pass, not the journal): directory mtimes are not compared.
    _same(src, dst, dir_mtimes=False)


def test_disconnect_with_queued_changes_keeps_no_journal(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b, cid = _mirrored(tmp_path, service)
    a.call("transmit", con_id=cid, action="pause")
    _write(f"{src}/d0/queued", b"queued, never sent\n")
    until(lambda: _status(a, cid)["queued_items"], "change queued")
    a.call("disconnect", con_id=cid)
    # Still in the queue, or already taken into the unsent batch: not in sync either way.
    unsent = ("items were still queued", "ops were not acknowledged")
    assert [e for e in _events(a, 51011) if any(u in e["message"] for u in unsent)]
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "walk"
    assert any(u in st["resync"]["reason"] for u in unsent)
    _same(src, dst)


def test_journal_over_its_bound_is_dropped(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b = _setup(tmp_path, service, journal_max_paths=5)
    for i in range(10):
        _write(f"{src}/d0/many{i}", b"x")
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "walk"
    assert "journal_max_paths" in st["resync"]["reason"]
    _same(src, dst)


def test_rule_change_drops_the_journal(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b = _setup(tmp_path, service)
    _write(f"{src}/d0/new", b"source change\n")
    a.call(
        "repset_create",
        name="rs",
        rules=[f"{src} inc, rec", f"{src}/d5 exc, rec", f"{src}/d4 exc, rec"],
        replace=True,
    )
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "walk"
    assert "rules changed" in st["resync"]["reason"]
    shutil.rmtree(f"{src}/d4")
    shutil.rmtree(f"{dst}/d4")  # excluded now: the walk leaves the old copy alone
    _same(src, dst)


def test_full_mirror_mode_walks(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b = _setup(tmp_path, service)
    _write(f"{src}/d0/new", b"source change\n")
    st = _resync(a, b, dst, mirror="full")
    assert st["resync"]["method"] == "walk" and "full" in st["resync"]["reason"]
    _same(src, dst)


def test_journal_resync_of_a_set_with_two_roots(tmp_path: Any, service: Factory) -> None:
    """The base (common directory of two roots) is not watched: its attributes are sent
    by every resync, as the walk sends them."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _tree(src)
    os.unlink(f"{src}/link")
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src}/d0 inc, rec", f"{src}/d1 inc, rec"])
    cid = _connect(a, b, dst, mirror="full")
    settle(a, cid)
    _disconnect(a, cid)
    for d in ("d2", "d3", "d4", "d5"):
        shutil.rmtree(f"{src}/{d}")  # outside both roots: never replicated
    os.chmod(src, 0o711)
    _write(f"{src}/d0/new", b"new\n")
    os.rename(f"{src}/d1/f000", f"{src}/d0/from-d1")
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "journal", st["resync"]
    _same(src, dst)


def test_capture_overflow_drops_the_journal(tmp_path: Any, service: Factory) -> None:
    """An inotify queue overflow while disconnected: the journal may miss changes, so
    the resync walks. (The source's capture is created with a 64-event kernel queue;
    the global knob is restored at once, as in test_inotify_overflow_triggers_remirror.)"""

    def small(name: str, **kw: Any) -> ServiceProcess:
        with small_inotify_queue(64):
            return service(name, **kw)

    src, dst, a, b = _setup(tmp_path, small)
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)  # its capture cannot read: the queue overflows
    try:
        for i in range(500):
            _write(f"{src}/d0/burst{i}", b"x" * i)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "walk"
    assert "overflow" in st["resync"]["reason"]
    _same(src, dst)


@pytest.mark.parametrize("side", ["source", "target"])
def test_a_mount_refuses_the_journal(tmp_path: Any, service: Factory, side: str) -> None:
    """A file system mounted over a directory changes what the path shows without any
    inotify event: on either side, the resync must walk."""
    src, dst, a, b = _setup(tmp_path, service)
    over = f"{src}/d0" if side == "source" else f"{dst}/d0"
    # The target arms its token in the background after the close; mounted before that
    # is done, the token is refused for another reason (the mount's new root "changed").
    time.sleep(0.5)
    sh("mount", "-t", "tmpfs", "-o", "size=8m", "dtake-test", over)
    try:
        if side == "source":
            _write(f"{over}/on-the-mount", b"only on the mounted file system\n")
        st = _resync(a, b, dst)
        assert st["resync"]["method"] == "walk", st["resync"]
        assert "mounted" in st["resync"]["reason"], st["resync"]
        if side == "source":
            # The walk sends what the mount shows (the files it hides stay on the target
            # as orphans: orphans are off).
            with open(f"{dst}/d0/on-the-mount", "rb") as fh:
                assert fh.read() == b"only on the mounted file system\n"
        else:
            _same(src, dst, dir_mtimes=False)  # d0's mtime: the tmpfs root's
    finally:
        sh("umount", over)


def test_unanswered_close_keeps_no_journal(tmp_path: Any, service: Factory) -> None:
    """The target never answers the disconnect's close (frozen): no token, no journal."""
    src, dst, a, b, cid = _mirrored(tmp_path, service)
    assert b.proc is not None
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        a.call("disconnect", con_id=cid)  # the close waits 5 s, then gives up
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert a.call("status")["journals"] == []
    _write(f"{src}/d0/new", b"source change\n")
    st = _resync(a, b, dst)
    assert st["resync"]["method"] == "walk"
    assert "no detach token" in st["resync"]["reason"]
    _same(src, dst)

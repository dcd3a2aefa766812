"""Change journal (dtake/service/journal.py): marking rules, the bound, the replay's
order and ops (against a recording queue; its pause against a real connection and
target tree), and the target's detach tokens (real inotify on a temporary directory)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dtake.ops import OpKind
from dtake.rules import RuleSet
from dtake.service.journal import (
    ATTRS,
    DIR,
    ENTRY,
    PARENT,
    SUBTREE,
    ChangeJournal,
    TargetTokens,
    mounts_near,
    replay,
)
from dtake.service.source import BIG_FILE, FILES_FILE_MAX, FILES_OP_BYTES, Connection
from dtake.testing import tree_diff
from tests.unit.source_support import Pair, write

B = "/data"


def _journal(max_paths: int = 1000) -> ChangeJournal:
    rules = RuleSet.from_list([f"{B} inc, rec", f"{B}/cache exc, rec", f"{B}/*.tmp exc"])
    return ChangeJournal(("rs", "h", 1, "/t"), rules, max_paths=max_paths)


# --- marking -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "path", "is_dir", "dest", "marks"),
    [
        ("created", f"{B}/a/f", False, None, {f"{B}/a/f": ENTRY, f"{B}/a": PARENT | DIR}),
        ("closed_write", f"{B}/f", False, None, {f"{B}/f": ENTRY, B: PARENT | DIR}),
        ("modified", f"{B}/a/f", False, None, {f"{B}/a/f": ENTRY, f"{B}/a": PARENT | DIR}),
        ("symlink", f"{B}/l", False, None, {f"{B}/l": ENTRY, B: PARENT | DIR}),
        (
            "mkdir",
            f"{B}/a/d",
            True,
            None,
            {f"{B}/a/d": ENTRY | SUBTREE | DIR, f"{B}/a": PARENT | DIR},
        ),
        ("deleted", f"{B}/a/f", False, None, {f"{B}/a/f": ENTRY, f"{B}/a": PARENT | DIR}),
        (
            "deleted",
            f"{B}/a/d",
            True,
            None,
            {f"{B}/a/d": ENTRY | DIR, f"{B}/a": PARENT | DIR},
        ),
        # Attributes only: the parent's mtime did not move.
        ("attrib", f"{B}/a/f", False, None, {f"{B}/a/f": ATTRS}),
        ("attrib", f"{B}/a", True, None, {f"{B}/a": ATTRS | DIR}),
        # A rename marks both paths and both parents; a directory's new path with its
        # subtree (the target has the old contents under the old name).
        (
            "moved",
            f"{B}/a/f",
            False,
            f"{B}/b/g",
            {
                f"{B}/a/f": ENTRY,
                f"{B}/a": PARENT | DIR,
                f"{B}/b/g": ENTRY,
                f"{B}/b": PARENT | DIR,
            },
        ),
        (
            "moved",
            f"{B}/a",
            True,
            f"{B}/z",
            {f"{B}/a": ENTRY | DIR, f"{B}/z": ENTRY | SUBTREE | DIR, B: PARENT | DIR},
        ),
        # Moved out of the set (into an excluded directory): only the old path.
        (
            "moved",
            f"{B}/a/f",
            False,
            f"{B}/cache/f",
            {f"{B}/a/f": ENTRY, f"{B}/a": PARENT | DIR},
        ),
        # Moved in from an excluded name: only the new path.
        ("moved", f"{B}/x.tmp", False, f"{B}/x", {f"{B}/x": ENTRY, B: PARENT | DIR}),
        # Excluded, outside the set: nothing.
        ("created", f"{B}/cache/f", False, None, {}),
        ("created", f"{B}/x.tmp", False, None, {}),
        ("created", "/elsewhere/f", False, None, {}),
    ],
)
def test_marks(kind: str, path: str, is_dir: bool, dest: str | None, marks: dict[str, int]) -> None:
    j = _journal()
    j.mark_event(kind, path, is_dir=is_dir, dest=dest)
    assert j.marks == marks


def test_marks_accumulate_per_path() -> None:
    j = _journal()
    j.mark_event("attrib", f"{B}/f")
    j.mark_event("modified", f"{B}/f")
    j.mark_event("attrib", B, is_dir=True)
    assert j.marks == {f"{B}/f": ATTRS | ENTRY, B: PARENT | DIR | ATTRS}


def test_bound_invalidates_and_frees() -> None:
    j = _journal(max_paths=3)
    j.mark_event("created", f"{B}/a")  # a + base
    j.mark_event("created", f"{B}/b")  # b
    assert not j.invalid and len(j) == 3
    j.mark_event("created", f"{B}/c")
    assert "journal_max_paths" in j.invalid
    assert len(j) == 0
    j.mark_event("created", f"{B}/d")  # an invalid journal marks nothing more
    assert len(j) == 0


@pytest.mark.parametrize("kind", ["deleted", "moved"])
def test_a_root_that_goes_invalidates(kind: str) -> None:
    # The capture drops a vanished root's watches: what is made there later is unseen.
    j = _journal()
    j.mark_event(kind, B, is_dir=True, dest="/elsewhere" if kind == "moved" else None)
    assert "watched root" in j.invalid


def test_invalidate_keeps_the_first_reason() -> None:
    j = _journal()
    j.mark_event("created", f"{B}/a")
    j.invalidate("inotify queue overflow")
    j.invalidate("rules changed")
    assert j.invalid == "inotify queue overflow" and not j.marks


# --- replay ------------------------------------------------------------------------------


class _Queue:
    def __init__(self, budget: int = 64 << 20) -> None:
        self.items: list[tuple[str, str, str]] = []
        self.inos: dict[tuple[str, str], int | None] = {}  # the inode the caller passed
        self.slices: list[int] = []  # sizes of the put_lazy_many calls
        self.files: dict[str, list[str]] = {}  # FILES items: directory -> names
        self.budget = budget

    def wait_room(self, stop: Any) -> None:
        pass

    def put_lazy(
        self, kind: str, path: str, *, mode: str = "realtime", ino: int | None = None, **_: Any
    ) -> bool:
        self.items.append((kind, path, mode))
        self.inos[kind, path] = ino
        return True

    def put_lazy_many(self, entries: list[tuple[str, str, str, int]]) -> bool:
        self.slices.append(len(entries))
        for kind, path, mode, ino in entries:
            self.items.append((kind, path, mode))
            self.inos[kind, path] = ino
        return True

    def put_files(
        self, path: str, names: list[str], *, mode: str, data_bytes: int = 0, **_: Any
    ) -> tuple[bool, bool, list[str]]:
        self.items.append(("files", path, mode))
        self.files[path] = self.files.get(path, []) + names
        return True, True, []

    def put_delete(self, src: str, op: Any) -> bool:
        assert op.kind == OpKind.DELETE
        self.items.append(("delete", src, op.path))
        return True

    def put_marker(self, kind: str, **meta: Any) -> bool:
        self.items.append((kind, "", str(meta.get("mode"))))
        return True


class _Svc:
    @staticmethod
    def is_internal(path: str) -> bool:
        return False


class _Conn:
    """What replay uses of a Connection; the walk is the real one."""

    _walk_dirs = Connection._walk_dirs
    _queue_walked = Connection._queue_walked
    _put_walked = Connection._put_walked
    _put_walked_files = Connection._put_walked_files
    _walk_room = Connection._walk_room
    files_file_max = FILES_FILE_MAX
    files_op_bytes = FILES_OP_BYTES
    _peer_files = False  # (no read-ahead)
    _mirror_hold = Connection._mirror_hold
    _entry_kind = Connection._entry_kind
    rel = Connection.rel

    def __init__(self, base: str) -> None:
        self.base = base
        self.rules = RuleSet.from_list([f"{base} inc, rec", f"{base}/*.tmp exc"])
        self.queue = _Queue()
        self.svc = _Svc()
        self._stop = threading.Event()
        self._mirror_pause = threading.Event()
        self.mirror_total = 0
        self.mirror_queued_done = False
        self.warned: list[str] = []
        from dtake.service.journal import ResyncState

        self.resync = ResyncState()

    def _warn_hardlink(self, path: str, st: os.stat_result) -> None:
        self.warned.append(path)


def _put(path: str, data: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def test_replay_order_and_ops(tmp_path: Any) -> None:
    base = str(tmp_path / "src")
    _put(f"{base}/a/f")
    _put(f"{base}/new/x/y")  # a new tree
    _put(f"{base}/hard")
    os.link(f"{base}/hard", f"{base}/hard2")
    os.symlink("a/f", f"{base}/link")
    _put(f"{base}/a/attr")
    _put(f"{base}/skip.tmp")
    j = ChangeJournal(("rs", "h", 1, "/t"), _Conn(base).rules, max_paths=100)
    for kind, path, is_dir in [
        ("modified", f"{base}/a/f", False),
        ("mkdir", f"{base}/new", True),
        ("created", f"{base}/new/x/y", False),  # below a walked subtree: not twice
        ("deleted", f"{base}/gone", True),
        ("created", f"{base}/gone/inner", False),  # below a deleted path: skipped
        ("created", f"{base}/hard", False),
        ("symlink", f"{base}/link", False),
        ("attrib", f"{base}/a/attr", False),
        ("created", f"{base}/skip.tmp", False),
    ]:
        j.mark_event(kind, path, is_dir=is_dir)
    conn = _Conn(base)
    replay(conn, j.marks, "differences", threading.Event())  # type: ignore[arg-type]
    items = conn.queue.items
    assert items[-1] == ("mirror_end", "", "differences")
    got = set(items[:-1])
    assert ("content", f"{base}/a/f", "differences") in got
    assert ("delete", f"{base}/gone", "gone") in got
    assert not [i for i in items if i[1].startswith(f"{base}/gone/")]
    assert ("mkdir", f"{base}/new", "full") in got
    assert ("mkdir", f"{base}/new/x", "full") in got
    # (a small file below the new tree: by name in its directory's FILES item, once)
    assert [i for i in items if i[1] == f"{base}/new/x"] == [
        ("mkdir", f"{base}/new/x", "full"),
        ("files", f"{base}/new/x", "differences"),
        ("attrs", f"{base}/new/x", "full"),
    ]
    assert conn.queue.files == {f"{base}/new/x": ["y"]}
    assert not [i for i in items if i[1] == f"{base}/new/x/y"]
    assert ("symlink", f"{base}/link", "full") in got
    assert ("attrs", f"{base}/a/attr", "full") in got
    assert conn.warned == [f"{base}/hard"]  # hard links are reported, not sent
    assert not [i for i in items if "skip.tmp" in i[1]]
    # Parents before children; directory attributes last, deepest first.
    order = [i[1] for i in items]
    assert order.index(f"{base}/new") < items.index(("files", f"{base}/new/x", "differences"))
    attrs = [i[1] for i in items if i[0] == "attrs" and os.path.isdir(i[1])]
    assert attrs == sorted(attrs, key=lambda p: -p.count("/"))
    assert {base, f"{base}/a", f"{base}/new", f"{base}/new/x"} <= set(attrs)
    assert conn.mirror_queued_done


def test_replay_queues_a_new_directory_entry_by_entry_as_the_walk(tmp_path: Any) -> None:
    # Every entry below a new directory, with the mirror walk's kind and the inode it
    # saw, in walk order and in slices (a small queue: two items a slice).
    base = str(tmp_path / "src")
    new = f"{base}/new"
    _put(f"{new}/c_dir/inner")
    os.makedirs(f"{new}/d_empty")
    with open(f"{new}/a_big", "wb") as fh:
        fh.truncate(BIG_FILE)  # block by block against the target's copy
    os.symlink("c_dir/inner", f"{new}/b_link")
    for i in range(5):
        _put(f"{new}/f{i}", b"y" * (i + 1))
    _put(f"{new}/hard")
    os.link(f"{new}/hard", f"{new}/hard2")
    os.mkfifo(f"{new}/g_fifo")  # neither a directory nor a link: content, as the walk
    j = ChangeJournal(("rs", "h", 1, "/t"), _Conn(base).rules, max_paths=100)
    j.mark_event("mkdir", new, is_dir=True)
    conn = _Conn(base)
    conn.queue = _Queue(budget=2 * 16 * 1024)
    replay(conn, j.marks, "differences", threading.Event())  # type: ignore[arg-type]
    items = conn.queue.items
    below = [i for i in items if i[1].startswith(new + "/") and i[0] not in ("attrs", "files")]
    # A directory's small regular files go by name in one FILES item, after its other
    # entries (the directory's own item is before them).
    assert below == [
        ("content", f"{new}/a_big", "checksum"),
        ("symlink", f"{new}/b_link", "full"),
        ("mkdir", f"{new}/c_dir", "full"),
        ("mkdir", f"{new}/d_empty", "full"),
        ("content", f"{new}/g_fifo", "differences"),
    ]
    assert [i for i in items if i[0] == "files"] == [
        ("files", new, "differences"),
        ("files", f"{new}/c_dir", "differences"),
    ]
    assert items.index(("files", new, "differences")) > items.index(below[-1])
    assert conn.queue.files == {new: ["f0", "f1", "f2", "f3", "f4"], f"{new}/c_dir": ["inner"]}
    assert items[0] == ("mkdir", new, "full")
    assert sorted(conn.warned) == [f"{new}/hard", f"{new}/hard2"]
    for kind, path, _mode in below:  # the walk's inode: no second lstat when queued
        assert conn.queue.inos[kind, path] == os.lstat(path).st_ino
    assert conn.queue.slices == [2, 2, 1]
    assert conn.mirror_total == BIG_FILE + sum(range(1, 6)) + 1  # a fifo: 0 bytes
    # Directory attributes again at the end, deepest first, empty directories too.
    attrs = [i[1] for i in items if i[0] == "attrs"]
    assert set(attrs) == {base, new, f"{new}/c_dir", f"{new}/d_empty"}
    assert attrs[-2:] == [new, base]
    assert items[-1] == ("mirror_end", "", "differences")


def test_replay_of_an_empty_journal_sends_the_base_attributes(tmp_path: Any) -> None:
    # As the walk, which always sends the base (with several roots it is not watched).
    base = str(tmp_path / "src")
    os.makedirs(base)
    conn = _Conn(base)
    replay(conn, {}, "differences", threading.Event())  # type: ignore[arg-type]
    assert conn.queue.items == [("attrs", base, "full"), ("mirror_end", "", "differences")]


def test_replay_of_a_cancelled_mirror_queues_no_end(tmp_path: Any) -> None:
    base = str(tmp_path / "src")
    _put(f"{base}/f")
    conn = _Conn(base)
    cancel = threading.Event()
    cancel.set()
    replay(conn, {f"{base}/f": ENTRY}, "differences", cancel)  # type: ignore[arg-type]
    assert conn.queue.items == [] and not conn.mirror_queued_done


def test_replay_of_a_paused_mirror_queues_nothing_more_until_resumed(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # `dtake mirror pause` right after the replay queued its first item: while paused
    # nothing more is queued (what was queued is sent); resumed, it ends with equal trees.
    pair = Pair(tmp_path, disk_queue=False)
    conn, src = pair.conn, pair.src
    try:
        for i in range(8):
            write(src / f"f{i}", f"file {i}")
        write(src / "old" / "x", "old")
        conn._enqueue_subtree(str(src), "realtime")
        pair.drain()  # the target has the tree
        j = ChangeJournal(("rs", "h", 1, str(pair.dst)), conn.rules, max_paths=100)
        for i in range(8):
            write(src / f"f{i}", f"file {i}, changed while disconnected")
            j.mark_event("closed_write", str(src / f"f{i}"))
        write(src / "new" / "a" / "leaf", "new")
        j.mark_event("mkdir", str(src / "new"), is_dir=True)
        (src / "old" / "x").unlink()
        (src / "old").rmdir()
        j.mark_event("deleted", str(src / "old"), is_dir=True)

        queued: list[str] = []  # the queue's put calls

        def spying(name: str) -> Any:
            real = getattr(conn.queue, name)

            def spy(*args: Any, **kw: Any) -> Any:
                queued.append(name)
                if len(queued) == 1:
                    conn.pause_mirror()
                return real(*args, **kw)

            return spy

        for name in ("put_lazy", "put_lazy_many", "put_delete", "put_marker"):
            monkeypatch.setattr(conn.queue, name, spying(name))
        conn.mirror_status = "Mirroring"  # as start_mirror sets it
        cancel = threading.Event()
        t = threading.Thread(target=replay, args=(conn, j.marks, "differences", cancel))
        t.start()
        try:
            t.join(0.5)
            pair.drain()  # what was queued before the pause goes on being sent
            t.join(0.3)
            assert t.is_alive() and queued == ["put_lazy"] and not conn.mirror_queued_done
            assert (pair.dst / "f0").read_text() == "file 0, changed while disconnected"
            assert (pair.dst / "f1").read_text() == "file 1"  # not queued: not sent
            conn.resume_mirror()
            t.join(10)
        finally:
            cancel.set()
        assert not t.is_alive() and conn.mirror_queued_done
        pair.drain()
        assert tree_diff(str(src), str(pair.dst), dir_mtimes=True) == []
    finally:
        pair.close()


# --- target detach tokens ----------------------------------------------------------------


def _root(tmp_path: Any) -> str:
    root = str(tmp_path / "dst")
    _put(f"{root}/d/f")
    _put(f"{root}/g")
    return root


def test_token_of_an_unchanged_tree_is_valid_once(tmp_path: Any) -> None:
    root = _root(tmp_path)
    tokens = TargetTokens()
    tok = tokens.issue(root)
    with open(f"{root}/d/f", "rb") as fh:  # reading is no change
        fh.read()
    assert tokens.check(root, tok) == (True, "")
    ok, why = tokens.check(root, tok)  # consumed
    assert not ok and "no detach token" in why


@pytest.mark.parametrize(
    "change",
    [
        lambda r: _put(f"{r}/d/f", b"changed"),
        lambda r: os.chmod(f"{r}/g", 0o600),
        lambda r: os.unlink(f"{r}/g"),
        lambda r: os.mkdir(f"{r}/d/new"),
        lambda r: os.rename(f"{r}/d", f"{r}/e"),
    ],
    ids=["write", "chmod", "delete", "mkdir", "rename"],
)
def test_any_change_spoils_the_token(tmp_path: Any, change: Any) -> None:
    root = _root(tmp_path)
    tokens = TargetTokens()
    tok = tokens.issue(root)
    tokens._by_root[os.path.normpath(root)]._armed.wait(10)
    change(root)
    ok, why = tokens.check(root, tok)
    assert not ok and "changed" in why


def test_a_newer_token_replaces_the_older(tmp_path: Any) -> None:
    root = _root(tmp_path)
    tokens = TargetTokens()
    old = tokens.issue(root)
    new = tokens.issue(root)
    ok, why = tokens.check(root, old)
    assert not ok and "newer" in why
    assert tokens.check(root, new) == (True, "")


def test_token_for_a_missing_root_is_refused(tmp_path: Any) -> None:
    tokens = TargetTokens()
    tok = tokens.issue(str(tmp_path / "missing"))
    ok, why = tokens.check(str(tmp_path / "missing"), tok)
    assert not ok and "missing" in why


def test_mounts_near_takes_mounts_at_below_and_above(tmp_path: Any) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 0:5 / /srv rw - ext4 /dev/sdb1 rw\n"
        "3 2 0:6 / /srv/www/cache rw - tmpfs tmpfs rw\n"
        "4 1 0:7 / /srv2 rw - tmpfs tmpfs rw\n"
        "5 2 0:8 / /srv/my\\040data rw - tmpfs tmpfs rw\n"
        "6 1 0:9 / /var rw - tmpfs tmpfs rw\n"
    )
    got = mounts_near(["/srv/www"], table=str(table))
    assert got == {"1 /", "2 /srv", "3 /srv/www/cache"}
    assert "5 /srv/my data" in mounts_near(["/srv/my data/x"], table=str(table))
    assert mounts_near(["/srv/www"], table=str(tmp_path / "none")) == {"?"}


def test_a_replaced_root_refuses_the_token(tmp_path: Any) -> None:
    root = _root(tmp_path)
    tokens = TargetTokens()
    tok = tokens.issue(root)
    tokens._by_root[os.path.normpath(root)]._armed.wait(10)
    os.rename(root, f"{root}.old")
    os.makedirs(root)
    ok, why = tokens.check(root, tok)
    assert not ok and ("no longer the directory" in why or "changed" in why)


def test_ctime_floor_separates_earlier_and_later_changes(tmp_path: Any) -> None:
    # Linux 6.13+ stamps fine-grained ctimes, ahead of the coarse clock: a file written
    # just before must be below the floor, one written just after at or above it.
    from dtake.service.journal import ctime_floor

    for i in range(50):
        _put(f"{tmp_path}/before{i}")
        floor = ctime_floor()
        _put(f"{tmp_path}/after{i}")
        assert os.lstat(f"{tmp_path}/before{i}").st_ctime_ns < floor
        assert os.lstat(f"{tmp_path}/after{i}").st_ctime_ns >= floor


def test_a_change_while_the_watches_are_added_is_caught_by_its_ctime(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The point in time scripted "before" every entry's ctime: as if the entries had
    # changed after the close, while the watches were being added (no inotify event
    # can report that; the ctime does).
    import dtake.service.journal as journal

    root = _root(tmp_path)
    monkeypatch.setattr(journal, "ctime_floor", lambda: 1)
    tokens = TargetTokens()
    tok = tokens.issue(root)
    ok, why = tokens.check(root, tok)
    assert not ok and "changed after the close" in why


def test_a_change_before_a_late_arming_thread_runs_is_caught(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The arming thread may start long after the close answer (a loaded machine): a
    # change made in between has no watch to report it, so the floor its ctime is
    # compared with must be taken when the token is issued, not when the thread runs.
    import dtake.service.journal as journal

    root = _root(tmp_path)
    go = threading.Event()
    arm = journal.TargetWatch._arm

    def late_arm(self: Any) -> None:
        go.wait(10)
        arm(self)

    monkeypatch.setattr(journal.TargetWatch, "_arm", late_arm)
    tokens = TargetTokens()
    tok = tokens.issue(root)
    victim = next(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    with open(victim, "ab") as fh:
        fh.write(b"changed on the target")
    go.set()
    ok, why = tokens.check(root, tok)
    assert not ok and "changed after the close" in why

"""Target apply: every op kind, holes, atomic whole-file transfers, replay, confinement."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from dtake.ops import Op, OpKind
from dtake.service.apply import (
    ConfinementError,
    Entry,
    TargetTree,
    is_temp_name,
    split_rel,
    temp_name,
)

MTIME = 1_600_000_000_123_456_789
K = OpKind


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "target"


@pytest.fixture
def tree(root: Path) -> Iterator[TargetTree]:
    t = TargetTree(str(root))
    yield t
    t.close()


def whole(tree: TargetTree, path: str, data: bytes, **attrs: Any) -> None:
    tree.apply(Op(K.FILE_BEGIN, path))
    if data:
        tree.apply(Op(K.WRITE, path, data=data))
    tree.apply(Op(K.FILE_END, path, size=len(data), **attrs))


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- basic ops --------------------------------------------------------------------------------


def test_root_created_and_mkdir_with_attrs(root: Path, tree: TargetTree) -> None:
    assert root.is_dir()
    tree.apply(Op(K.MKDIR, "a/b/c", mode=0o750, uid=12, gid=34, mtime_ns=MTIME))
    st = os.stat(root / "a/b/c")
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (12, 34, MTIME)
    assert stat.S_IMODE(os.stat(root / "a").st_mode) == 0o755  # implicit parents


def test_mkdir_replaces_file_and_symlink(root: Path, tree: TargetTree) -> None:
    (root / "f").write_bytes(b"x")
    os.symlink("/tmp", root / "l")
    tree.apply(Op(K.MKDIR, "f", mode=0o700))
    tree.apply(Op(K.MKDIR, "l", mode=0o700))
    assert (root / "f").is_dir() and not (root / "l").is_symlink() and (root / "l").is_dir()


def test_whole_file_attrs_and_exact_mtime(root: Path, tree: TargetTree) -> None:
    whole(tree, "d/f.txt", b"hello", mode=0o4640, uid=1000, gid=1001, mtime_ns=MTIME)
    st = os.stat(root / "d/f.txt")
    assert (root / "d/f.txt").read_bytes() == b"hello"
    assert stat.S_IMODE(st.st_mode) == 0o4640  # set-id bit kept: chmod comes after chown
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1000, 1001, MTIME)
    assert listing(root) == ["d", "d/f.txt"]  # no temp file left


def test_file_end_replaces_directory(root: Path, tree: TargetTree) -> None:
    (root / "x/y").mkdir(parents=True)
    (root / "x/y/z").write_bytes(b"old")
    whole(tree, "x", b"now a file")
    assert (root / "x").read_bytes() == b"now a file"


def test_write_in_place_and_setsize(root: Path, tree: TargetTree) -> None:
    (root / "f").write_bytes(b"0123456789")
    tree.apply(Op(K.WRITE, "f", offset=2, data=b"ab"))
    assert (root / "f").read_bytes() == b"01ab456789"
    tree.apply(Op(K.SETSIZE, "f", size=4, mode=0o600, mtime_ns=MTIME))
    assert (root / "f").read_bytes() == b"01ab"
    st = os.stat(root / "f")
    assert st.st_mtime_ns == MTIME and stat.S_IMODE(st.st_mode) == 0o600
    tree.apply(Op(K.TRUNCATE, "f", size=0))
    assert (root / "f").read_bytes() == b""
    tree.apply(Op(K.WRITE, "new/g", offset=3, data=b"z"))  # created if missing
    assert (root / "new/g").read_bytes() == b"\0\0\0z"


def test_rename_file_dir_and_replace(root: Path, tree: TargetTree) -> None:
    whole(tree, "a/f", b"A")
    whole(tree, "b", b"B")
    tree.apply(Op(K.RENAME, "a/f", new_path="new/dir/g"))  # missing destination parents
    assert (root / "new/dir/g").read_bytes() == b"A" and not (root / "a/f").exists()
    tree.apply(Op(K.RENAME, "b", new_path="new/dir/g"))  # replaces a file
    assert (root / "new/dir/g").read_bytes() == b"B"
    tree.apply(Op(K.MKDIR, "full"))
    whole(tree, "full/inner", b"I")
    tree.apply(Op(K.RENAME, "new", new_path="full"))  # replaces a non-empty dir
    assert listing(root) == ["a", "full", "full/dir", "full/dir/g"]


def test_rename_onto_own_ancestor_refused(root: Path, tree: TargetTree) -> None:
    whole(tree, "a/b", b"x")
    with pytest.raises(OSError):
        tree.apply(Op(K.RENAME, "a/b", new_path="a"))
    with pytest.raises(OSError):
        tree.apply(Op(K.RENAME, "a", new_path="a/b/c"))
    assert (root / "a/b").read_bytes() == b"x"


def test_delete_file_link_tree_and_missing(root: Path, tree: TargetTree) -> None:
    whole(tree, "d/e/f", b"x")
    tree.apply(Op(K.SYMLINK, "l", link="d"))
    whole(tree, "g", b"y")
    tree.apply(Op(K.DELETE, "l"))
    assert (root / "d/e/f").exists()  # deleting a link never touches its target
    tree.apply(Op(K.DELETE, "d"))
    tree.apply(Op(K.DELETE, "g"))
    tree.apply(Op(K.DELETE, "never/was"))
    assert listing(root) == []


def test_attrs_partial_and_missing(root: Path, tree: TargetTree) -> None:
    whole(tree, "f", b"x", mode=0o644, uid=5, gid=6, mtime_ns=MTIME)
    tree.apply(Op(K.ATTRS, "f", mode=0o600))
    st = os.stat(root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o600, 5, 6, MTIME)
    tree.apply(Op(K.ATTRS, "f", gid=7, mtime_ns=MTIME + 1))
    st = os.stat(root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o600,
        5,
        7,
        MTIME + 1,
    )
    tree.apply(Op(K.ATTRS, "missing", mode=0o600))  # replayed after a delete: no-op
    tree.apply(Op(K.ATTRS, "", mode=0o711, mtime_ns=MTIME))  # the root itself
    assert os.stat(root).st_mtime_ns == MTIME and stat.S_IMODE(os.stat(root).st_mode) == 0o711


def test_symlink_stored_as_is(root: Path, tree: TargetTree) -> None:
    tree.apply(Op(K.SYMLINK, "abs", link="/etc/passwd", uid=3, gid=4, mtime_ns=MTIME))
    tree.apply(Op(K.SYMLINK, "rel", link="../../outside"))
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "rel") == "../../outside"
    st = os.lstat(root / "abs")
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (3, 4, MTIME)
    whole(tree, "f", b"x")
    tree.apply(Op(K.SYMLINK, "f", link="other"))  # replaces a file
    assert os.readlink(root / "f") == "other"
    with pytest.raises(ValueError):
        tree.apply(Op(K.SYMLINK, "bad", link=""))


def test_barrier_is_noop(root: Path, tree: TargetTree) -> None:
    tree.apply(Op(K.BARRIER, seq=5))
    assert listing(root) == []


# -- holes, atomicity, concurrency ------------------------------------------------------------


def test_sparse_file_holes_preserved(root: Path, tree: TargetTree) -> None:
    size = 64 * 1024 * 1024
    tree.apply(Op(K.FILE_BEGIN, "sparse"))
    tree.apply(Op(K.WRITE, "sparse", offset=0, data=b"a" * 4096))
    tree.apply(Op(K.WRITE, "sparse", offset=size // 2, data=b"b" * 4096))
    tree.apply(Op(K.FILE_END, "sparse", size=size, mtime_ns=MTIME))
    st = os.stat(root / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 < 1024 * 1024  # ~8 KiB of data, not 64 MiB
    with open(root / "sparse", "rb") as f:
        f.seek(size // 2)
        assert f.read(4096) == b"b" * 4096
        f.seek(size - 10)
        assert f.read() == b"\0" * 10


def test_final_name_never_partial(root: Path, tree: TargetTree) -> None:
    whole(tree, "f", b"old content")
    tree.apply(Op(K.FILE_BEGIN, "f"))
    for i in range(4):
        tree.apply(Op(K.WRITE, "f", offset=i * 3, data=b"new"))
        assert (root / "f").read_bytes() == b"old content"  # unchanged mid-transfer
        assert [e.path for e in tree.scan()] == ["f"]  # temp file not listed
    tree.apply(Op(K.FILE_END, "f", size=12))
    assert (root / "f").read_bytes() == b"new" * 4


def test_interleaved_transfers(root: Path, tree: TargetTree) -> None:
    tree.apply(Op(K.FILE_BEGIN, "a"))
    tree.apply(Op(K.FILE_BEGIN, "d/b"))
    tree.apply(Op(K.WRITE, "d/b", data=b"BBB"))
    tree.apply(Op(K.WRITE, "a", data=b"AA"))
    assert tree.transfers_in_progress() == ["a", "d/b"]
    tree.apply(Op(K.FILE_END, "d/b", size=3))
    tree.apply(Op(K.FILE_END, "a", size=2))
    assert (root / "a").read_bytes() == b"AA" and (root / "d/b").read_bytes() == b"BBB"
    assert tree.transfers_in_progress() == []


def test_delete_and_rename_abort_transfers(root: Path, tree: TargetTree) -> None:
    tree.apply(Op(K.FILE_BEGIN, "d/f"))
    tree.apply(Op(K.WRITE, "d/f", data=b"x"))
    tree.apply(Op(K.DELETE, "d"))
    assert tree.transfers_in_progress() == [] and listing(root) == []
    tree.apply(Op(K.FILE_BEGIN, "e/g"))
    tree.apply(Op(K.MKDIR, "e"))
    tree.apply(Op(K.RENAME, "e", new_path="h"))
    assert tree.transfers_in_progress() == [] and listing(root) == ["h"]


def test_file_end_without_begin_finishes_in_place(root: Path, tree: TargetTree) -> None:
    """Receiver restarted mid-transfer: the rest arrives as in-place writes."""
    tree.apply(Op(K.WRITE, "f", offset=0, data=b"abcdef"))
    tree.apply(Op(K.FILE_END, "f", size=4, mode=0o640, mtime_ns=MTIME))
    assert (root / "f").read_bytes() == b"abcd"
    st = os.stat(root / "f")
    assert st.st_mtime_ns == MTIME and stat.S_IMODE(st.st_mode) == 0o640


def test_cleanup_temp_after_crash(root: Path) -> None:
    t1 = TargetTree(str(root))
    t1.apply(Op(K.FILE_BEGIN, "d/f"))
    t1.apply(Op(K.WRITE, "d/f", data=b"partial"))
    tmp = [n for n in os.listdir(root / "d") if is_temp_name(n)]
    assert len(tmp) == 1
    # Simulate a crash: a second tree on the same root, the first never closed properly.
    (root / "d" / temp_name("g")).write_bytes(b"left over")
    (root / ".keep.dtake-notatoken").write_bytes(b"user file")
    t2 = TargetTree(str(root))
    try:
        assert t2.cleanup_temp() == 2
        assert sorted(os.listdir(root)) == [".keep.dtake-notatoken", "d"]
        assert os.listdir(root / "d") == []
    finally:
        t2.close()
        t1.close()


def test_close_removes_unfinished_temp(root: Path) -> None:
    t = TargetTree(str(root))
    t.apply(Op(K.FILE_BEGIN, "f"))
    t.close()
    assert listing(root) == []
    with pytest.raises(ValueError):
        t.apply(Op(K.MKDIR, "x"))


# -- idempotent replay ------------------------------------------------------------------------


def _replay_ops() -> list[Op]:
    return [
        Op(K.MKDIR, "d", mode=0o755, mtime_ns=MTIME),
        Op(K.FILE_BEGIN, "d/f"),
        Op(K.WRITE, "d/f", data=b"payload"),
        Op(K.FILE_END, "d/f", size=7, mode=0o644, mtime_ns=MTIME),
        Op(K.SYMLINK, "d/l", link="f", mtime_ns=MTIME),
        Op(K.WRITE, "d/f", offset=0, data=b"P"),
        Op(K.SETSIZE, "d/f", size=7, mtime_ns=MTIME),
        Op(K.ATTRS, "d/f", mode=0o600, mtime_ns=MTIME),
        Op(K.RENAME, "d/f", new_path="d/g"),
        Op(K.DELETE, "d/gone"),
    ]


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        data = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, data)
        if not p.is_dir():
            out[str(p.relative_to(root))] += (st.st_mtime_ns,)
    return out


def test_idempotent_reapply(root: Path, tree: TargetTree, tmp_path: Path) -> None:
    for op in _replay_ops():
        tree.apply(op)
    first = snapshot(root)
    assert first["d/g"][4] == b"Payload" and "d/f" not in first
    for _ in range(2):  # the whole sequence again, as a source resending after a crash
        for op in _replay_ops():
            tree.apply(op)
        assert snapshot(root) == first
    # Each op applied twice in a row (a batch resent before its ack arrived).
    other = TargetTree(str(tmp_path / "twice"))
    try:
        for op in _replay_ops():
            other.apply(op)
            other.apply(op)
        assert snapshot(tmp_path / "twice") == first
    finally:
        other.close()


# -- scan and hashes --------------------------------------------------------------------------


def test_scan_entries(root: Path, tree: TargetTree) -> None:
    tree.apply(Op(K.MKDIR, "d", mode=0o750, uid=1, gid=2, mtime_ns=MTIME))
    whole(tree, "d/f", b"12345", mode=0o640, uid=3, gid=4, mtime_ns=MTIME)
    tree.apply(Op(K.SYMLINK, "d/l", link="/nowhere"))
    tree.apply(Op(K.FILE_BEGIN, "d/pending"))
    os.mkfifo(root / "fifo")
    entries = list(tree.scan())
    assert [(e.path, e.kind) for e in entries] == [("d", "d"), ("d/f", "f"), ("d/l", "l")]
    f = entries[1]
    assert f == Entry("d/f", "f", 5, MTIME, 0o640, 3, 4, None, 1)
    assert entries[2].link == "/nowhere"
    assert [e.path for e in tree.scan("d")] == ["d/f", "d/l"]
    assert list(tree.scan("missing")) == [] and list(tree.scan("d/f")) == []


def test_scan_does_not_follow_symlinked_dirs(root: Path, tree: TargetTree, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    os.symlink(outside, root / "link")
    assert [e.path for e in tree.scan()] == ["link"]
    with pytest.raises(ConfinementError):
        list(tree.scan("link"))


def test_block_hashes_and_digest(root: Path, tree: TargetTree) -> None:
    data = os.urandom(10_000)
    whole(tree, "f", data)
    assert tree.block_hashes("f", 4096) == [
        xxhash.xxh3_64_intdigest(data[i : i + 4096]) for i in range(0, len(data), 4096)
    ]
    assert tree.file_digest("f") == xxhash.xxh3_128(data).digest()
    whole(tree, "empty", b"")
    assert tree.block_hashes("empty", 4096) == []
    tree.apply(Op(K.SYMLINK, "l", link="f"))
    for rel in ("missing", "l", "nodir/x"):
        with pytest.raises(FileNotFoundError):
            tree.block_hashes(rel, 4096)
        with pytest.raises(FileNotFoundError):
            tree.file_digest(rel)


def test_temp_names() -> None:
    n = temp_name("file.txt")
    assert n.startswith(".file.txt.dtake-") and is_temp_name(n)
    assert not is_temp_name("file.txt") and not is_temp_name(".x.dtake-short")
    assert len(os.fsencode(temp_name("x" * 255))) <= 255


# -- confinement: crafted ops -----------------------------------------------------------------


def fingerprint(path: Path) -> dict[str, tuple[Any, ...]]:
    """Everything about a directory tree that an escape could change (incl. the top)."""
    out: dict[str, tuple[Any, ...]] = {}
    for p in [path, *sorted(path.rglob("*"))]:
        st = os.lstat(p)
        content: Any = None
        if p.is_symlink():
            content = os.readlink(p)
        elif p.is_file():
            content = hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, content)
    return out


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory outside the root with a file, a subdir and known attributes."""
    s = tmp_path / "sentinel"
    (s / "sub").mkdir(parents=True)
    (s / "passwd").write_bytes(b"root:x:0:0\n")
    (s / "sub" / "x").write_bytes(b"x")
    for p in (s / "passwd", s / "sub" / "x", s / "sub", s):
        os.utime(p, ns=(MTIME, MTIME))
    return s


BAD_PATHS = [
    "../x",
    "a/../../x",
    "/etc/passwd",
    "a/./b",
    "./a",
    "a//b",
    "a/",
    "a\0b",
    "..",
    ".",
    "",
]


# What the tree applies (FILES ops are expanded into FILE_END ops on the wire first:
# tests/unit/test_files_op.py crafts those).
APPLIED_KINDS = [k for k in OpKind if k not in (OpKind.BARRIER, OpKind.FILES)]


@pytest.mark.parametrize("bad", BAD_PATHS)
@pytest.mark.parametrize("kind", APPLIED_KINDS)
def test_crafted_paths_refused(
    root: Path, tree: TargetTree, sentinel: Path, kind: OpKind, bad: str
) -> None:
    if bad == "" and kind in (K.MKDIR, K.ATTRS):
        pytest.skip("the empty path names the root itself for MKDIR/ATTRS")
    before = fingerprint(sentinel)
    ops = [
        Op(kind, bad, data=b"PWNED", size=1, mode=0o777, mtime_ns=1, new_path="ok", link="x"),
        Op(kind, "ok", new_path=bad, data=b"PWNED", size=1, link="x"),
    ]
    refused = 0
    for op in ops:
        try:
            tree.apply(op)
        except ConfinementError as exc:
            assert exc.code == "PATH_ESCAPE"
            refused += 1
    assert refused >= 1
    if kind is K.RENAME:
        assert refused == 2
    assert fingerprint(sentinel) == before
    assert not os.path.exists("/etc/PWNED")


@pytest.mark.parametrize("kind", APPLIED_KINDS)
def test_symlinked_parent_dir_refused(
    root: Path, tree: TargetTree, sentinel: Path, kind: OpKind
) -> None:
    os.symlink(sentinel, root / "esc")
    before = fingerprint(sentinel)
    cases = [("esc/passwd", "ok"), ("esc/sub/x", "ok"), ("esc/new", "ok"), ("esc/sub", "ok")]
    if kind is K.RENAME:  # the destination side too
        cases += [("ok", "esc/passwd"), ("ok", "esc/sub"), ("ok", "esc/sub/new")]
    for path, new in cases:
        whole(tree, "ok", b"ok")
        op = Op(kind, path, new_path=new, data=b"PWNED", size=1, mode=0o777, uid=1, mtime_ns=1)
        op.link = "x"
        with pytest.raises(ConfinementError):
            tree.apply(op)
    assert fingerprint(sentinel) == before
    assert (root / "ok").read_bytes() == b"ok"


@pytest.mark.parametrize("kind", [K.WRITE, K.TRUNCATE, K.SETSIZE])
def test_symlink_final_component_not_written(
    root: Path, tree: TargetTree, sentinel: Path, kind: OpKind
) -> None:
    os.symlink(sentinel / "passwd", root / "lnk")
    os.symlink(sentinel / "absent", root / "dangling")
    before = fingerprint(sentinel)
    for name in ("lnk", "dangling"):
        with pytest.raises(ConfinementError):
            tree.apply(Op(kind, name, data=b"PWNED", size=0, mode=0o777, mtime_ns=1))
    assert fingerprint(sentinel) == before
    assert not (sentinel / "absent").exists()


def test_symlink_final_component_attrs_delete_rename(
    root: Path, tree: TargetTree, sentinel: Path
) -> None:
    os.symlink(sentinel / "passwd", root / "lnk")
    os.symlink(sentinel, root / "dlnk")
    before = fingerprint(sentinel)
    tree.apply(Op(K.ATTRS, "lnk", mode=0o777, uid=1, gid=1, mtime_ns=1))  # the link itself
    assert os.lstat(root / "lnk").st_uid == 1 and os.lstat(root / "lnk").st_mtime_ns == 1
    tree.apply(Op(K.MKDIR, "dlnk", mode=0o777))  # replaces the link by a directory
    assert (root / "dlnk").is_dir() and not (root / "dlnk").is_symlink()
    os.symlink(sentinel, root / "dlnk2")
    tree.apply(Op(K.DELETE, "dlnk2"))  # removes the link, not the tree behind it
    os.symlink(sentinel / "sub", root / "src")
    whole(tree, "f", b"f")
    tree.apply(Op(K.RENAME, "src", new_path="moved"))  # moves the link itself
    assert os.readlink(root / "moved") == str(sentinel / "sub")
    tree.apply(Op(K.RENAME, "f", new_path="lnk"))  # replaces the link, does not follow it
    assert (root / "lnk").read_bytes() == b"f" and not (root / "lnk").is_symlink()
    os.symlink(sentinel, root / "dst")
    whole(tree, "g", b"g")
    tree.apply(Op(K.RENAME, "g", new_path="dst"))
    assert (root / "dst").read_bytes() == b"g"
    os.symlink(sentinel / "passwd", root / "end")
    whole(tree, "end", b"whole")  # FILE_END renames over the link
    assert (root / "end").read_bytes() == b"whole"
    os.symlink(sentinel, root / "slink")
    tree.apply(Op(K.SYMLINK, "slink", link="elsewhere"))
    assert os.readlink(root / "slink") == "elsewhere"
    assert fingerprint(sentinel) == before


def test_hardlink_to_outside_is_broken_not_written(
    root: Path, tree: TargetTree, sentinel: Path
) -> None:
    os.link(sentinel / "passwd", root / "hl")
    before = fingerprint(sentinel)
    tree.apply(Op(K.WRITE, "hl", offset=0, data=b"PWNED"))
    tree.apply(Op(K.SETSIZE, "hl", size=5, mode=0o777, mtime_ns=1))
    assert (root / "hl").read_bytes() == b"PWNED"
    # Only the link count of the outside file may change (our name went away).
    after = fingerprint(sentinel)
    assert after == before


def test_root_replaced_by_readonly_bind_mount_still_writable(root: Path, tmp_path: Path) -> None:
    """Blocking target paths: a read-only bind mount over the root does not stop the service."""
    if os.geteuid() != 0:
        pytest.skip("needs root for mount")
    tree = TargetTree(str(root))
    try:
        import subprocess

        rc = subprocess.run(
            ["mount", "--bind", "-o", "ro", str(root), str(root)], capture_output=True, check=False
        ).returncode
        if rc != 0:
            pytest.skip("bind mounts not available here")
        try:
            with pytest.raises(OSError):
                (root / "blocked").write_bytes(b"x")  # other programs see read-only
            whole(tree, "d/f", b"through the fd")
            tree.apply(Op(K.RENAME, "d/f", new_path="d/g"))
        finally:
            subprocess.run(["umount", str(root)], check=True, timeout=30)
        assert (root / "d/g").read_bytes() == b"through the fd"
    finally:
        tree.close()


def test_split_rel() -> None:
    assert split_rel("a/b") == ("a", "b")
    assert split_rel("", allow_root=True) == ()
    assert split_rel("..a/b..") == ("..a", "b..")  # dots inside names are fine
    for bad in BAD_PATHS:
        with pytest.raises(ConfinementError):
            split_rel(bad)
    with pytest.raises(ConfinementError):
        split_rel(b"a")


# -- one-op small files, the directory cache, compact scans -----------------------------------


def small(path: str, data: bytes, **attrs: Any) -> Op:
    """A whole small file in one op, as the source sends it (FILE_END tagged ``whole``)."""
    return Op(K.FILE_END, path, data=data, size=len(data), tags={"whole": 1}, **attrs)


def test_whole_op_writes_file_attrs_and_mtime(root: Path, tree: TargetTree) -> None:
    tree.apply(small("d/f.txt", b"hello", mode=0o4640, uid=1000, gid=1001, mtime_ns=MTIME))
    tree.apply(small("d/g", b"", mode=0o666, mtime_ns=MTIME))  # beyond the umask: chmod
    tree.apply(small("d/h", b"data", uid=os.geteuid(), gid=os.getegid(), mode=0o600))
    st = os.stat(root / "d/f.txt")
    assert (root / "d/f.txt").read_bytes() == b"hello"
    assert stat.S_IMODE(st.st_mode) == 0o4640
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1000, 1001, MTIME)
    assert stat.S_IMODE(os.stat(root / "d/g").st_mode) == 0o666
    assert os.stat(root / "d/g").st_size == 0
    assert (root / "d/h").read_bytes() == b"data"
    assert listing(root) == ["d", "d/f.txt", "d/g", "d/h"]  # no temp file left


def test_whole_op_in_setgid_dir_gets_source_group(root: Path, tree: TargetTree) -> None:
    (root / "sg").mkdir()
    os.chown(root / "sg", -1, 4242)
    os.chmod(root / "sg", 0o2775)
    tree.apply(small("sg/f", b"x", uid=os.geteuid(), gid=os.getegid(), mode=0o644))
    assert os.stat(root / "sg/f").st_gid == os.getegid()


def test_whole_op_replaces_dir_symlink_and_transfer(root: Path, tree: TargetTree) -> None:
    (root / "x/y").mkdir(parents=True)
    os.symlink("/etc/passwd", root / "l")
    tree.apply(Op(K.FILE_BEGIN, "p"))
    tree.apply(small("x", b"now a file"))
    tree.apply(small("l", b"not followed"))
    tree.apply(small("p", b"whole wins"))
    assert (root / "x").read_bytes() == b"now a file"
    assert not (root / "l").is_symlink() and (root / "l").read_bytes() == b"not followed"
    assert (root / "p").read_bytes() == b"whole wins"
    assert tree.transfers_in_progress() == []
    assert listing(root) == ["l", "p", "x"]


def test_whole_op_symlinked_parent_refused(root: Path, tree: TargetTree, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "esc")
    with pytest.raises(ConfinementError):
        tree.apply(small("esc/f", b"PWNED"))
    assert list(outside.iterdir()) == []


def test_dir_cache_follows_namespace_ops(root: Path, tree: TargetTree, tmp_path: Path) -> None:
    """Cached parent fds never send a file into a renamed, deleted or replaced directory."""
    tree.apply(small("a/b/f1", b"1"))
    tree.apply(Op(K.RENAME, "a", new_path="z"))
    tree.apply(small("a/b/f2", b"2"))  # a new a/b, not z/b
    assert (root / "z/b/f1").read_bytes() == b"1" and not (root / "z/b/f2").exists()
    assert (root / "a/b/f2").read_bytes() == b"2"
    tree.apply(Op(K.DELETE, "a"))
    tree.apply(small("a/b/f3", b"3"))
    assert listing(root / "a") == ["b", "b/f3"]
    # A failed op empties the cache too; and the idle release closes every cached fd.
    tree.apply(small("c/d/f", b"x"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.rename(root / "c/d", tmp_path / "moved")
    os.symlink(outside, root / "c/d")
    tree.release_dirs()
    with pytest.raises(ConfinementError):
        tree.apply(small("c/d/g", b"PWNED"))
    assert list(outside.iterdir()) == []


def test_dir_cache_bounded(root: Path, tree: TargetTree) -> None:
    from dtake.service import apply as apply_mod

    for i in range(apply_mod.DIR_CACHE_MAX + 10):
        tree.apply(small(f"d{i}/f", b"x"))
    assert len(tree._dirs) <= apply_mod.DIR_CACHE_MAX
    tree.release_dirs()
    assert tree._dirs == {}


def test_scan_rows_match_scan(root: Path, tree: TargetTree) -> None:
    tree.apply(Op(K.MKDIR, "d", mode=0o750, uid=1, gid=2, mtime_ns=MTIME))
    for i in range(7):
        tree.apply(small(f"d/e{i % 3}/f{i}", b"x" * i, mode=0o640, uid=3, gid=4, mtime_ns=MTIME))
    tree.apply(Op(K.SYMLINK, "d/l", link="/nowhere"))
    tree.apply(Op(K.FILE_BEGIN, "d/pending"))
    os.mkfifo(root / "fifo")
    expected = [
        [e.path, e.kind, e.size, e.mtime_ns, e.mode, e.uid, e.gid, e.link] for e in tree.scan()
    ]
    chunks = list(tree.scan_rows("", chunk=4))
    assert all(len(c) > 0 for c in chunks) and len(chunks) > 1
    rows = [row for c in chunks for row in c]
    assert sorted(rows) == sorted(expected) and len(rows) == len(expected)
    # Each directory's row comes before the rows below it.
    pos = {r[0]: n for n, r in enumerate(rows)}
    assert all(pos[p.rsplit("/", 1)[0]] < n for p, n in pos.items() if "/" in p)
    assert sorted(r[0] for c in tree.scan_rows("d/e1") for r in c) == [
        e.path for e in tree.scan("d/e1")
    ]
    assert list(tree.scan_rows("missing")) == [] and list(tree.scan_rows("d/e0/f0")) == []
    # Short rows (a differences mirror's request): the first four fields, same order.
    short = [row for c in tree.scan_rows("", chunk=4, short=True) for row in c]
    assert short == [row[:4] for row in rows]


def test_apply_whole_files_in_two_threads(root: Path, tree: TargetTree, tmp_path: Path) -> None:
    """Independent small files applied as a batch: same result as one by one, errors
    per op in order, a directory in the way replaced, a symlinked parent refused."""
    (root / "b").mkdir()
    (root / "b" / "f3").mkdir()  # a directory where a file goes: redone by the applier
    (root / "b" / "f3" / "inner").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "esc")
    ops = [
        small(f"{'ab'[i % 2]}/f{i}", bytes([i]) * i, mode=0o640, mtime_ns=MTIME) for i in range(20)
    ]
    ops[5] = small("esc/f5", b"PWNED")
    tree._file_s = 1.0  # a slow file system: two writers
    results = tree.apply_whole_files(ops)
    assert [type(r) for r in results] == [type(None)] * 5 + [ConfinementError] + [type(None)] * 14
    for i in range(20):
        if i == 5:
            continue
        p = root / "ab"[i % 2] / f"f{i}"
        assert p.read_bytes() == bytes([i]) * i
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == MTIME
    assert list(outside.iterdir()) == []
    assert not any(is_temp_name(n) for _, _, names in os.walk(root) for n in names)


@pytest.mark.parametrize("batch", [False, True], ids=["one-op", "two-writers"])
def test_whole_op_creates_a_new_name_in_place_and_replaces_an_old_one(
    root: Path, tree: TargetTree, monkeypatch: pytest.MonkeyPatch, batch: bool
) -> None:
    """A name that does not exist is written in place (no temp file, no rename: a third
    less kernel time per new file); an existing file is still replaced atomically (a
    temp file renamed over it: a new inode, the old one never half written)."""
    import dtake.service.apply as apply_mod

    (root / "d").mkdir()
    (root / "d" / "old").write_bytes(b"old")
    old_ino = os.stat(root / "d" / "old").st_ino
    renamed: list[str] = []
    real_rename = os.rename

    def rename(src: str, dst: str, **kw: Any) -> None:
        renamed.append(dst)
        real_rename(src, dst, **kw)

    monkeypatch.setattr(apply_mod.os, "rename", rename)
    ops = [small(f"d/new{i}", b"n" * i, mtime_ns=MTIME) for i in range(9)]
    ops.append(small("d/old", b"replaced", mtime_ns=MTIME))
    if batch:
        assert tree.apply_whole_files(ops) == [None] * len(ops)
    else:
        for op in ops:
            tree.apply(op)
    assert renamed == ["old"]  # only the existing name went through a temp file
    assert (root / "d" / "old").read_bytes() == b"replaced"
    assert os.stat(root / "d" / "old").st_ino != old_ino
    for i in range(9):
        assert (root / "d" / f"new{i}").read_bytes() == b"n" * i
        assert os.stat(root / "d" / f"new{i}").st_mtime_ns == MTIME
    assert sorted(os.listdir(root / "d")) == ["new" + str(i) for i in range(9)] + ["old"]


def test_whole_op_that_fails_leaves_neither_a_new_name_nor_a_temp_file(
    root: Path, tree: TargetTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (disk full) on a new name removes the name it created; on an
    existing name it removes its temp file and the old file stays as it was."""
    import dtake.service.apply as apply_mod

    (root / "keep").write_bytes(b"keep me")

    def full(fd: int, data: Any, offset: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(apply_mod, "_pwrite_all", full)
    for path in ("new", "keep"):
        with pytest.raises(OSError):
            tree.apply(small(path, b"data", mtime_ns=MTIME))
    assert listing(root) == ["keep"]
    assert (root / "keep").read_bytes() == b"keep me"


def test_second_writer_only_while_files_are_slow_to_write(
    root: Path, tree: TargetTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fast file creation: one writer (a helper thread would cost more than it saves).
    Once writing a file takes TWO_WRITERS_FROM_S or more on average, half of each run
    goes to the helper thread; fast again, back to one writer. The time each file takes
    is scripted (a clock that the writes advance); the files are really written."""
    import threading

    import dtake.service.apply as apply_mod

    writers: list[set[str]] = []
    now = [0.0]
    cost = [0.0]  # scripted wall time of one file (two writers overlap theirs)
    lock = threading.Lock()
    real = apply_mod.TargetTree._whole_at

    def whole_at(self: Any, op: Op, *args: Any, **kw: Any) -> None:
        with lock:
            writers[-1].add(threading.current_thread().name)
            now[0] += cost[0] / len(writers[-1])
        real(self, op, *args, **kw)

    monkeypatch.setattr(apply_mod.TargetTree, "_whole_at", whole_at)
    tree._clock = lambda: now[0]

    def run(n: int) -> int:
        writers.append(set())
        ops = [small(f"r{n}/d{i % 2}/f{i}", b"x") for i in range(16)]
        assert tree.apply_whole_files(ops) == [None] * 16
        return len(writers[-1])

    cost[0] = 10e-6
    assert [run(n) for n in range(3)] == [1, 1, 1]  # fast: one writer
    cost[0] = 400e-6  # ext4 without a journal after mass deletes
    slow = [run(n) for n in range(3, 9)]
    assert slow[0] == 1 and slow[-1] == 2  # two once the average was slow
    cost[0] = 10e-6
    back = [run(n) for n in range(9, 20)]
    assert back[0] == 2 and back[-1] == 1  # and back to one
    assert all(
        (root / f"r{n}/d{i % 2}/f{i}").read_bytes() == b"x" for n in range(20) for i in range(16)
    )


def test_whole_runs_are_independent_paths() -> None:
    from dtake.service.target import _whole_run

    def w(path: str, seq: int) -> Op:
        return Op(K.FILE_END, path, seq=seq, data=b"x", size=1, tags={"whole": 1})

    ops = [w("a/1", 1), w("a/2", 2), w("b/1", 3), w("a/1", 4), w("c", 5)]
    assert [o.seq for o in _whole_run(ops, 0, 0)] == [1, 2, 3]  # a/1 again: a new run
    assert [o.seq for o in _whole_run(ops, 3, 0)] == [4, 5]
    assert _whole_run(ops, 0, 1) == []  # already applied: sequential path
    nested = [w("d", 1), w("d/x", 2)]  # a file, then a file below it
    assert len(_whole_run(nested, 0, 0)) == 1
    mixed = [w("e/1", 1), Op(K.RENAME, "e", seq=2, new_path="f"), w("e/2", 3)]
    assert len(_whole_run(mixed, 0, 0)) == 1
    # a file that is an ancestor of a later op's directory, several levels up, after
    # ops in other directories
    deep = [w("p/1", 1), w("q", 2), w("p/2", 3), w("q/r/s/t", 4)]
    assert [o.seq for o in _whole_run(deep, 0, 0)] == [1, 2, 3]
    up = [w("u/v/w/1", 1), w("u/v", 2)]  # a file where an earlier op has a parent
    assert [o.seq for o in _whole_run(up, 0, 0)] == [1]


def test_file_begin_size_preallocates_and_file_end_trims(root: Path, tree: TargetTree) -> None:
    """A size on FILE_BEGIN (a file without holes) allocates it up front; if the file
    shrank meanwhile, FILE_END still leaves exactly the sent length and data."""
    mb = 1024 * 1024
    chunk = os.urandom(mb)
    for name, planned, sent in (("same", 3 * mb, 3), ("shrank", 3 * mb, 2), ("grew", 2 * mb, 3)):
        tree.apply(Op(K.FILE_BEGIN, name, size=planned))
        for i in range(sent):
            tree.apply(Op(K.WRITE, name, offset=i * mb, data=chunk))
        tree.apply(Op(K.FILE_END, name, size=sent * mb, mode=0o644, mtime_ns=MTIME))
        st = os.stat(root / name)
        assert st.st_size == sent * mb and st.st_mtime_ns == MTIME
        assert (root / name).read_bytes() == chunk * sent
    assert listing(root) == ["grew", "same", "shrank"]


def test_root_reopened_not_dupped(root: Path, tree: TargetTree) -> None:
    """Each scan of the root gets its own open file description (a dup'd fd shares one,
    and with it btrfs's cached listing: a second scan then missed replaced entries)."""
    import fcntl

    first = tree._open_dir((), create=False)
    second = tree._open_dir((), create=False)
    assert first is not None and second is not None
    try:
        # Status flags live in the open file description: a dup would see the change.
        fcntl.fcntl(first, fcntl.F_SETFL, fcntl.fcntl(first, fcntl.F_GETFL) | os.O_NONBLOCK)
        assert not fcntl.fcntl(second, fcntl.F_GETFL) & os.O_NONBLOCK
        assert not fcntl.fcntl(tree._root_fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(first)
        os.close(second)
    for i in range(3):
        (root / f"f{i}").write_bytes(b"")
    assert len(list(tree.scan())) == 3 and len(list(tree.scan())) == 3


def _big_transfer(
    tree: TargetTree, path: str, data: bytes, chunks: list[tuple[int, int]]
) -> list[bool]:
    """FILE_BEGIN with the size, WRITEs of ``chunks`` (offset, length) as views of a
    frame-like buffer at an odd address, FILE_END; whether each write left O_DIRECT on."""
    frame = bytearray(b"\0" * 13 + data)  # data at an unaligned address, as received
    view = memoryview(frame)[13:]
    tree.apply(Op(K.FILE_BEGIN, path, size=len(data)))
    direct = []
    for off, n in chunks:
        tree.apply(Op(K.WRITE, path, offset=off, data=view[off : off + n]))  # type: ignore[arg-type]
        direct.append(tree._transfers[path].direct)
    tree.apply(Op(K.FILE_END, path, size=len(data), mode=0o640, mtime_ns=MTIME))
    return direct


def test_big_transfer_is_written_direct_then_its_tail_buffered(
    tree: TargetTree, root: Path
) -> None:
    mib = 1024 * 1024
    data = os.urandom(5 * mib + 1234)
    chunks = [(i * mib, mib) for i in range(5)] + [(5 * mib, 1234)]
    direct = _big_transfer(tree, "big", data, chunks)
    assert direct == [True] * 5 + [False]  # aligned chunks direct, the short tail not
    assert (root / "big").read_bytes() == data
    st = os.stat(root / "big")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == MTIME


def test_unaligned_write_in_a_big_transfer_falls_back_to_the_page_cache(
    tree: TargetTree, root: Path
) -> None:
    mib = 1024 * 1024
    data = os.urandom(6 * mib)
    # A file that changed while read: a short chunk, then chunks at unaligned offsets.
    chunks = [(0, mib), (mib, 1000), (mib + 1000, mib), (2 * mib + 1000, 4 * mib - 1000)]
    direct = _big_transfer(tree, "f", data, chunks)
    assert direct == [True, False, False, False]
    assert (root / "f").read_bytes() == data


def test_small_transfers_are_not_direct(tree: TargetTree, root: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    assert _big_transfer(tree, "f", data, [(0, len(data))]) == [False]
    assert (root / "f").read_bytes() == data

"""Checksum verification's hashing and its request seam (dtake.service.verify)."""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

import pytest

from dtake.errors import DtakeError, E
from dtake.service.apply import TargetTree, block_hashes_fd, file_digest_fd
from dtake.service.source import BLOCK, Connection
from dtake.service.verify import (
    BLOCKS,
    DIGEST,
    _content_may_differ,
    _Entry,
    _local_hashes_batch,
    _needs_blocks,
    _Pipeline,
    _RemoteHashes,
    digest_fd,
    target_digests_batch,
    target_hashes_batch,
)

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 16 * BLOCK, 16 * BLOCK + 1, 40 * BLOCK + 7]


@pytest.mark.parametrize("size", SIZES)
def test_digest_equals_the_targets_whole_file_digest(tmp_path: Any, size: int) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(size))
    fd = os.open(p, os.O_RDONLY)
    try:
        mine = digest_fd(fd, size)
        assert mine == file_digest_fd(fd) and len(mine) == 16
    finally:
        os.close(fd)


def test_digest_sees_a_change_in_the_last_block_of_a_multi_chunk_file(tmp_path: Any) -> None:
    data = bytearray(os.urandom(40 * BLOCK + 7))
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(data)
    data[-3] ^= 0xFF
    b.write_bytes(data)
    got = _local_hashes_batch([str(a), str(b)], DIGEST)
    assert got[0] != got[1]
    blocks = _local_hashes_batch([str(a), str(b)], BLOCKS)
    differing = [i for i, (x, y) in enumerate(zip(blocks[0], blocks[1])) if x != y]
    assert differing == [40]  # the short last block only


def test_target_batches_are_confined_and_report_non_files(tmp_path: Any) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"x" * (BLOCK + 3))
    (root / "top").write_bytes(b"hello")
    (root / "link").symlink_to("top")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (root / "escape").symlink_to(outside)
    tree = TargetTree(str(root))
    try:
        rels = ["top", "d/a", "link", "missing", "d", "escape/secret", "d/none", "d/a"]
        digests = target_digests_batch(tree, rels)
        blocks = target_hashes_batch(tree, rels)
    finally:
        tree.close()
    # digests_batch: one per path, in order; hashes_batch: block lists by path
    assert len(digests) == len(rels)
    assert digests[1] == digests[7] == _digest_of(str(root / "d" / "a"))
    assert blocks["d/a"] == _blocks_of(str(root / "d" / "a"))
    assert digests[0] is not None and digests[0] != digests[1]
    assert blocks["top"] is not None and len(blocks["top"]) == 1
    # No regular file (symlink, missing, directory, through a symlinked directory): no
    # hash (verification reports it different), never a read outside the copy.
    assert digests[2:7] == [None] * 5
    assert [blocks[r] for r in rels[2:7]] == [None] * 5


def _digest_of(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return file_digest_fd(fd)
    finally:
        os.close(fd)


def _blocks_of(path: str) -> list[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return block_hashes_fd(fd, BLOCK)
    finally:
        os.close(fd)


class _Peer:
    """A connection's request seam: answers like a target of a given generation."""

    def __init__(self, tree: TargetTree, knows: set[str]) -> None:
        self.tree = tree
        self.knows = knows
        self.asked: list[str] = []
        self._pending: dict[int, tuple[str, dict[str, Any]]] = {}

    def _request_start(self, op: str, **args: Any) -> tuple[int, Any]:
        rid = len(self.asked)
        self.asked.append(op)
        self._pending[rid] = (op, args)
        return rid, None

    def _request_wait(self, rid: int, fs: Any) -> list[dict[str, Any]]:
        op, args = self._pending.pop(rid)
        return self._answer(op, args)

    def _request(self, op: str, **args: Any) -> list[dict[str, Any]]:
        self.asked.append(op)
        return self._answer(op, args)

    def _answer(self, op: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        if op not in self.knows:
            raise DtakeError(E.INVALID_COMMAND, f"unknown request {op!r}")
        if op == "digests_batch":
            return [{"digests": target_digests_batch(self.tree, args["paths"])}]
        if op == "hashes_batch":
            return [{"hashes": target_hashes_batch(self.tree, args["paths"])}]
        try:
            return [{"exists": True, "hashes": self.tree.block_hashes(args["path"], BLOCK)}]
        except FileNotFoundError:
            return [{"exists": False}]


@pytest.mark.parametrize(
    ("knows", "how", "asked"),
    [
        ({"digests_batch", "hashes_batch", "hashes"}, DIGEST, ["digests_batch"]),
        ({"hashes_batch", "hashes"}, BLOCKS, ["digests_batch", "hashes_batch"]),
        ({"hashes"}, BLOCKS, ["digests_batch", "hashes_batch", "hashes", "hashes"]),
    ],
)
def test_an_older_target_gets_the_request_it_knows(
    tmp_path: Any, knows: set[str], how: str, asked: list[str]
) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "a").write_bytes(os.urandom(3 * BLOCK + 1))
    tree = TargetTree(str(root))
    try:
        peer = _Peer(tree, knows)
        remote = _RemoteHashes(peer)  # type: ignore[arg-type]
        rels = ["a", "missing"]
        got_how, got = remote.wait(rels, remote.start(rels))
        assert got_how == how and peer.asked == asked
        want = _digest_of(str(root / "a")) if how == DIGEST else _blocks_of(str(root / "a"))
        assert got == [want, None]
        # The next batch goes straight to what the target knows.
        peer.asked.clear()
        remote.wait(rels, remote.start(rels))
        assert peer.asked == asked[-1:] * (2 if asked[-1] == "hashes" else 1)
        # Block lists (bytes out of sync) through the same fallbacks.
        peer.asked.clear()
        assert remote.blocks(["a"]) == [_blocks_of(str(root / "a"))]
    finally:
        tree.close()


def test_a_target_error_other_than_unknown_request_is_not_a_fallback(tmp_path: Any) -> None:
    class Failing(_Peer):
        def _answer(self, op: str, args: dict[str, Any]) -> list[dict[str, Any]]:
            raise DtakeError(E.UNKNOWN, "disk error")

    root = tmp_path / "t"
    root.mkdir()
    tree = TargetTree(str(root))
    try:
        remote = _RemoteHashes(Failing(tree, set()))  # type: ignore[arg-type]
        with pytest.raises(DtakeError) as err:
            remote.wait(["a"], remote.start(["a"]))
        assert err.value.code == E.UNKNOWN and remote.how == DIGEST
    finally:
        tree.close()


def test_a_closed_pipeline_drops_the_answer_boxes_of_its_outstanding_requests(
    tmp_path: Any,
) -> None:
    # After an error the scan and the batches still outstanding are forgotten (their
    # answers ignored); the boxes of other requests on the connection stay.
    conn = Connection.__new__(Connection)
    conn._ack_cond = threading.Condition()
    conn._resp = {}
    ids = itertools.count(1)

    def start(op: str, **args: Any) -> tuple[int, Any]:
        rid = next(ids)
        conn._resp[rid] = []
        return rid, None

    conn._request_start = start  # type: ignore[method-assign]
    p = _Pipeline(conn, lambda batch: None)
    f = tmp_path / "f"
    f.write_bytes(b"x")
    for _ in range(2):
        p.add(_Entry(str(f), "f", os.lstat(f), "f", None))
        p._flush()
    conn._resp[99] = [{"more": True}]
    assert sorted(conn._resp) == [1, 2, 3, 99]  # the scan, two batches, another's
    p.close()
    assert conn._resp == {99: [{"more": True}]}
    conn._request_drop(99, 100)  # an unknown id is no error
    assert conn._resp == {}


@pytest.mark.parametrize(
    ("kind", "reason", "content", "blocks"),
    [
        ("f", "checksum differs", True, True),
        ("f", "size differs (2 vs 1)", True, True),
        ("f", "date/time differs", True, True),
        ("f", "permissions differ", False, False),  # attributes only: no byte counted
        ("f", "owner differs", False, False),
        ("l", "link target differs", False, False),
    ],
)
def test_which_differences_count_bytes_out_of_sync(
    tmp_path: Any, kind: str, reason: str, content: bool, blocks: bool
) -> None:
    e = _Entry(str(tmp_path), "x", os.lstat(tmp_path), kind, None, reason)
    assert _content_may_differ(e) is content
    e.mine, e.theirs = b"a", b"b"  # digests: block lists are fetched to count the bytes
    assert _needs_blocks(e) is blocks
    e.mine, e.theirs = [1], [2]  # block lists already
    assert not _needs_blocks(e)

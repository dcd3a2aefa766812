"""Flow control between a source and a real target service: early acknowledgements."""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from dtake.ops import Op, OpKind
from dtake.protocol.auth import client_handshake, load_key
from dtake.protocol.framing import FrameSocket, MsgType
from dtake.protocol.opwire import encode_ops
from dtake.service.source import ACK_TAG
from dtake.testing import ServiceProcess
from tests.service_support import until

Factory = Callable[..., ServiceProcess]


def _open_session(b: ServiceProcess, keyfile: str, target: str) -> FrameSocket:
    """A raw source session to service B (handshake and ``open``), as dtake's source does."""
    fs = FrameSocket(socket.create_connection(("127.0.0.1", b.port), timeout=10))
    client_handshake(fs, load_key(keyfile), node_id="rawsrc", info={})
    fs.send_obj(
        MsgType.REQUEST,
        {
            "id": 0,
            "op": "open",
            "uuid": uuid.uuid4().hex,
            "epoch": uuid.uuid4().hex,
            "conn_id": 1,
            "repset": "rs",
            "target_path": target,
            "source_node": "rawsrc",
            "source_base": "/nonexistent",
            "data_state": "Mirroring",
        },
    )
    mtype, resp = fs.recv_obj(timeout=30)
    assert mtype == MsgType.RESPONSE and not resp.get("error"), resp
    return fs


def _whole(seq: int, name: str, data: bytes, **tags: Any) -> Op:
    op = Op(OpKind.FILE_END, name, seq=seq, size=len(data), mode=0o644, mtime_ns=10**18)
    op.data = data
    op.tags = {"whole": 1, **tags}
    return op


def test_target_acknowledges_a_frame_that_asks_at_once(
    tmp_path: Any, service: Factory, keyfile: str
) -> None:
    """Three frames wait in the paused target queue; after resume the target applies
    them in a row. Frames applied while others wait are acknowledged by the cumulative
    cadence only (one ACK per 2048 ops, 16 MiB or 50 ms) or once the queue is drained
    (seen without the flag: ACKs of 0 and 6 only); the flag on the second frame's last
    op makes the target acknowledge that frame right after applying it."""
    b = service("b")
    target = str(tmp_path / "dst")
    fs = _open_session(b, keyfile, target)
    try:
        b.call("target", action="pause")
        until(lambda: b.call("target", action="status")["status"] == "Paused", "Paused")
        frames = [
            [_whole(1, "f1", b"1"), _whole(2, "f2", b"2")],
            [_whole(3, "f3", b"3"), _whole(4, "f4", b"4", **{ACK_TAG: 1})],
            [_whole(5, "f5", b"5"), _whole(6, "f6", b"6")],
        ]
        for ops in frames:
            fs.send_parts(MsgType.OPS_DATA, encode_ops(ops))
        until(lambda: b.call("target", action="status")["queue_ops"] == 6, "6 ops queued")
        b.call("target", action="resume")
        acked: list[int] = []
        deadline = time.monotonic() + 30
        while (not acked or acked[-1] < 6) and time.monotonic() < deadline:
            mtype, obj = fs.recv_obj(timeout=30)
            if mtype == MsgType.ACK and obj["seq"] not in acked:
                acked.append(int(obj["seq"]))
        assert 4 in acked, acked  # the asking frame was acknowledged on its own
        assert acked[-1] == 6
        assert sorted(os.listdir(target)) == ["f1", "f2", "f3", "f4", "f5", "f6"]
        with open(os.path.join(target, "f4"), "rb") as fh:
            assert fh.read() == b"4"
    finally:
        fs.close()


def test_big_files_through_a_paused_target_queue_end_identical(
    tmp_path: Any, service: Factory
) -> None:
    """Big files (written with O_DIRECT on the target) queued while the target is
    paused, with a small window (early ACKs), then applied: byte for byte equal."""
    from tests.service_support import assert_same, settle

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    os.makedirs(src)
    rnd = random.Random(5)
    for i, size in enumerate([5 * 1024 * 1024 + 123, 8 * 1024 * 1024, 4 * 1024 * 1024 - 1]):
        with open(os.path.join(src, f"big{i}"), "wb") as fh:
            fh.write(rnd.randbytes(size))
    a = service("a", start=False, queue={"memory_max_mb": 8})
    a.extra["queue"]["disk_folder"] = os.path.join(a.root, "state", "queue")
    a.start()
    b = service("b")
    b.call("target", action="pause")
    until(lambda: b.call("target", action="status")["status"] == "Paused", "Paused")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    cid = a.call(
        "connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst, mirror="full"
    )["id"]
    until(lambda: b.call("target", action="status")["queue_ops"] > 0, "target queue fills")
    b.call("target", action="resume")
    settle(a, cid)
    assert_same(src, dst)

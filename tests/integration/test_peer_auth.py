"""Peer authentication over real TCP on 127.0.0.1: only a peer with the key gets ops applied."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from dtake.ops import Op, OpKind
from dtake.protocol.auth import client_handshake, generate_key_file, load_key, server_handshake
from dtake.protocol.errors import AuthError, ProtocolError
from dtake.protocol.framing import HEADER, MAGIC, PROTOCOL_VERSION, FrameSocket, MsgType

WAIT = 10.0


class MiniTarget:
    """A stand-in for the daemon's receiver: handshake, then apply OPS and ACK them."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.applied: list[Op] = []
        self.refusals: list[ProtocolError] = []
        self.sessions = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._done = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def apply(self, op: Op) -> None:
        with self._lock:
            self.applied.append(op)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._session(FrameSocket(conn, stall_timeout=WAIT))
            self._done.release()

    def _session(self, fs: FrameSocket) -> None:
        try:
            server_handshake(fs, self.key, node_id="target", timeout=WAIT)
        except ProtocolError as exc:
            with self._lock:
                self.refusals.append(exc)
            return
        with self._lock:
            self.sessions += 1
        try:
            while True:
                mtype, obj = fs.recv_obj(WAIT)
                if mtype is MsgType.OPS:
                    ops = [Op.from_wire(item) for item in obj]
                    for op in ops:
                        self.apply(op)
                    fs.send_obj(MsgType.ACK, ops[-1].seq if ops else 0)
        except (ProtocolError, TimeoutError):
            pass
        finally:
            fs.close()

    def wait_session_end(self) -> None:
        assert self._done.acquire(timeout=WAIT), "server session did not end"

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(); shutdown() does.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


@pytest.fixture
def key(tmp_path: Any) -> bytes:
    path = str(tmp_path / "cluster.key")
    generate_key_file(path)
    return load_key(path)


@pytest.fixture
def target(key: bytes) -> Iterator[MiniTarget]:
    t = MiniTarget(key)
    yield t
    t.close()


def _connect(port: int) -> FrameSocket:
    return FrameSocket(
        socket.create_connection(("127.0.0.1", port), timeout=WAIT), stall_timeout=WAIT
    )


def _ops() -> list[list[Any]]:
    return [
        Op(OpKind.MKDIR, "d", seq=1).to_wire(),
        Op(OpKind.WRITE, "d/f", seq=2, data=b"x").to_wire(),
    ]


def test_right_key_gets_ops_applied(target: MiniTarget, key: bytes) -> None:
    with _connect(target.port) as fs:
        peer = client_handshake(fs, key, node_id="source", info={"role": "source"})
        assert peer.node_id == "target" and peer.version == PROTOCOL_VERSION
        fs.send_obj(MsgType.OPS, _ops())
        assert fs.recv_obj(WAIT) == (MsgType.ACK, 2)
    target.wait_session_end()
    assert [op.path for op in target.applied] == ["d", "d/f"]
    assert target.refusals == []


def test_wrong_key_refused_nothing_applied(target: MiniTarget) -> None:
    with _connect(target.port) as fs:
        with pytest.raises(AuthError) as ei:
            client_handshake(fs, b"\x01" * 32, node_id="intruder", info={})
        assert ei.value.code == -138
    target.wait_session_end()
    assert target.applied == [] and target.sessions == 0
    assert len(target.refusals) == 1 and isinstance(target.refusals[0], AuthError)


def test_no_key_peer_sends_ops_directly(target: MiniTarget) -> None:
    """A peer without a key skips the handshake: refused, connection closed, nothing applied."""
    with _connect(target.port) as fs:
        fs.send_obj(MsgType.OPS, _ops()[:1])
        mtype, obj = fs.recv_obj(WAIT)
        assert mtype is MsgType.ERROR and obj["code"] == -138
        # The server closed: whatever we send next is never read.
        try:
            fs.send_obj(MsgType.OPS, _ops())
        except ProtocolError:
            pass
        with pytest.raises(ProtocolError):
            fs.recv(WAIT)
    target.wait_session_end()
    assert target.applied == [] and target.sessions == 0


def test_no_key_peer_forges_proof(target: MiniTarget) -> None:
    with _connect(target.port) as fs:
        fs.send_obj(
            MsgType.HELLO,
            {
                "proto": [PROTOCOL_VERSION, PROTOCOL_VERSION],
                "node_id": "x",
                "nonce": b"n" * 32,
                "info": {},
            },
        )
        assert fs.recv(WAIT)[0] is MsgType.CHALLENGE
        fs.send_obj(MsgType.AUTH, {"proof": b""})
        mtype, obj = fs.recv_obj(WAIT)
        assert mtype is MsgType.ERROR and obj["reason"] == "AUTH_FAILED"
    target.wait_session_end()
    assert target.applied == [] and target.sessions == 0


def test_oversized_unauthenticated_frame_refused(target: MiniTarget) -> None:
    sock = socket.create_connection(("127.0.0.1", target.port), timeout=WAIT)
    try:
        payload = msgpack.packb([Op(OpKind.WRITE, "f", data=b"x" * 100_000).to_wire()])
        sock.sendall(
            HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.OPS, 0, 0, len(payload), len(payload))
        )
        target.wait_session_end()
    finally:
        sock.close()
    assert target.applied == [] and target.sessions == 0
    assert target.refusals and target.refusals[0].reason == "FRAME_TOO_LARGE"


def test_many_bad_peers_then_good_one(target: MiniTarget, key: bytes) -> None:
    for i in range(5):
        with _connect(target.port) as fs, pytest.raises(AuthError):
            client_handshake(fs, bytes([i + 1]) * 32, node_id=f"bad{i}", info={})
        target.wait_session_end()
    with _connect(target.port) as fs:
        client_handshake(fs, key, node_id="source", info={})
        fs.send_obj(MsgType.OPS, _ops())
        assert fs.recv_obj(WAIT) == (MsgType.ACK, 2)
    target.wait_session_end()
    assert len(target.applied) == 2 and len(target.refusals) == 5

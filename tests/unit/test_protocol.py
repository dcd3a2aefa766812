"""Peer protocol: framing, compression, key files and the authentication handshake."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

from dtake.ops import Op, OpKind
from dtake.protocol.auth import (
    PeerInfo,
    client_handshake,
    generate_key_file,
    load_key,
    parse_key,
    server_handshake,
)
from dtake.protocol.compress import Codec, available_codecs, codec_by_id, get_codec
from dtake.protocol.errors import (
    AuthError,
    CompressionError,
    ConnectionClosed,
    FrameTooLarge,
    KeyFileError,
    ProtocolError,
    VersionError,
)
from dtake.protocol.framing import (
    HEADER,
    MAGIC,
    POST_AUTH_MAX_FRAME,
    PRE_AUTH_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameSocket,
    MsgType,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
WAIT = 10.0  # bounded waits only; never a timing assertion


@pytest.fixture
def pair() -> Iterator[tuple[FrameSocket, FrameSocket]]:
    a, b = socket.socketpair()
    fa, fb = FrameSocket(a, stall_timeout=WAIT), FrameSocket(b, stall_timeout=WAIT)
    yield fa, fb
    fa.close()
    fb.close()


@pytest.fixture
def authed_pair(
    pair: tuple[FrameSocket, FrameSocket],
) -> tuple[FrameSocket, FrameSocket]:
    for fs in pair:
        fs.mark_authenticated()
    return pair


class Runner:
    """Run a function in a thread and collect its result or exception (bounded join)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def join(self) -> Runner:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "thread did not finish"
        return self


# -- framing --------------------------------------------------------------------------------


def test_roundtrip_all_types(authed_pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = authed_pair
    for mtype in MsgType:
        payload = f"payload-{mtype.name}".encode()
        a.send(mtype, payload)
        assert b.recv(WAIT) == (mtype, payload)


def test_empty_payload(pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = pair
    assert a.send(MsgType.PING, b"") == HEADER.size
    assert b.recv(WAIT) == (MsgType.PING, b"")


def test_obj_roundtrip_carries_ops(authed_pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = authed_pair
    ops = [
        Op(OpKind.WRITE, "d/f", seq=7, offset=4096, data=b"\x00\xff" * 10),
        Op(OpKind.RENAME, "a", seq=8, new_path="b", tags={"mirror": True}),
        Op(OpKind.FILE_END, "d/f", seq=9, size=10, mode=0o644, uid=1, gid=2, mtime_ns=123),
    ]
    a.send_obj(MsgType.OPS, [op.to_wire() for op in ops])
    mtype, obj = b.recv_obj(WAIT)
    assert mtype is MsgType.OPS
    assert [Op.from_wire(item) for item in obj] == ops


def test_large_frame_gather_write(authed_pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = authed_pair
    payload = os.urandom(3 * 1024 * 1024 + 17)
    sender = Runner(lambda: a.send(MsgType.OPS, payload))
    assert b.recv(WAIT) == (MsgType.OPS, payload)
    assert sender.join().error is None
    assert sender.result == HEADER.size + len(payload)


def test_recv_timeout_keeps_stream_usable(pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = pair
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.05)
    a.send(MsgType.PING, b"x")
    assert b.recv(WAIT) == (MsgType.PING, b"x")


def test_concurrent_senders_keep_frames_whole(
    authed_pair: tuple[FrameSocket, FrameSocket],
) -> None:
    a, b = authed_pair
    n, size = 20, 200_000

    def blast(tag: int) -> None:
        for i in range(n):
            a.send(MsgType.OPS, bytes([tag]) * size + i.to_bytes(4, "big"))

    runners = [Runner(lambda t=t: blast(t)) for t in (1, 2, 3)]
    seen: dict[int, list[int]] = {1: [], 2: [], 3: []}
    for _ in range(3 * n):
        _, payload = b.recv(WAIT)
        tag = payload[0]
        assert payload[:size] == bytes([tag]) * size  # no interleaving inside a frame
        seen[tag].append(int.from_bytes(payload[size:], "big"))
    for r in runners:
        assert r.join().error is None
    assert all(v == list(range(n)) for v in seen.values())


def test_clean_close_between_frames(pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = pair
    a.close()
    with pytest.raises(ConnectionClosed):
        b.recv(WAIT)


def test_close_mid_frame_is_protocol_error() -> None:
    raw, peer = socket.socketpair()
    fs = FrameSocket(peer, stall_timeout=WAIT)
    raw.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 0, 0, 100, 100) + b"abc")
    raw.close()
    with pytest.raises(ProtocolError) as ei:
        fs.recv(WAIT)
    assert ei.value.reason == "TRUNCATED"
    assert fs.closed


def test_stall_mid_frame_is_bounded() -> None:
    raw, peer = socket.socketpair()
    fs = FrameSocket(peer, stall_timeout=0.2)
    raw.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 0, 0, 100, 100))
    with pytest.raises(ProtocolError) as ei:
        fs.recv(WAIT)
    assert ei.value.reason == "STALLED"
    raw.close()


@pytest.mark.parametrize(
    "blob, reason",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "BAD_MAGIC"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20, "BAD_MAGIC"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, 99, 0, 0, 0, 0), "BAD_TYPE"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 0x10, 0, 0, 0), "BAD_HEADER"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 0, 1, 0, 0), "BAD_HEADER"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 0, 0, 5, 6), "BAD_HEADER"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 9, 0, 5, 6), "COMPRESSION"),
    ],
)
def test_garbage_is_rejected(blob: bytes, reason: str) -> None:
    raw, peer = socket.socketpair()
    fs = FrameSocket(peer, stall_timeout=WAIT)
    raw.sendall(blob)
    with pytest.raises(ProtocolError) as ei:
        fs.recv(WAIT)
    assert ei.value.reason == reason
    # Receiving stays refused afterwards: the stream is out of step.
    with pytest.raises(ProtocolError):
        fs.recv(WAIT)
    fs.close()
    raw.close()


def test_other_protocol_version_is_version_error() -> None:
    raw, peer = socket.socketpair()
    fs = FrameSocket(peer, stall_timeout=WAIT)
    raw.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION + 1, MsgType.HELLO, 0, 0, 0, 0))
    with pytest.raises(VersionError) as ei:
        fs.recv(WAIT)
    assert ei.value.code == -157
    assert ei.value.peer_version == PROTOCOL_VERSION + 1
    fs.close()
    raw.close()


def test_pre_auth_limit_checked_before_allocation() -> None:
    raw, peer = socket.socketpair()
    fs = FrameSocket(peer, stall_timeout=WAIT)
    # Announce 4 GiB - 1 and send nothing more: refused from the header alone.
    raw.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.OPS, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF))
    with pytest.raises(FrameTooLarge) as ei:
        fs.recv(WAIT)
    assert "before authentication" in str(ei.value)
    fs.close()
    raw.close()


def test_limits_pre_and_post_auth(pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = pair
    assert a.max_frame == PRE_AUTH_MAX_FRAME
    with pytest.raises(FrameTooLarge):
        a.send(MsgType.OPS, b"x" * (PRE_AUTH_MAX_FRAME + 1))
    a.send(MsgType.OPS, b"x" * PRE_AUTH_MAX_FRAME)
    assert b.recv(WAIT)[1] == b"x" * PRE_AUTH_MAX_FRAME
    a.mark_authenticated()
    b.mark_authenticated()
    assert a.max_frame == POST_AUTH_MAX_FRAME
    a.send(MsgType.OPS, b"y" * (PRE_AUTH_MAX_FRAME * 4))
    assert b.recv(WAIT)[1] == b"y" * (PRE_AUTH_MAX_FRAME * 4)


def test_post_auth_limit_on_receive() -> None:
    raw, peer = socket.socketpair()
    fs = FrameSocket(peer, stall_timeout=WAIT)
    fs.mark_authenticated(max_frame=1000)
    raw.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.OPS, 0, 0, 1001, 1001))
    with pytest.raises(FrameTooLarge):
        fs.recv(WAIT)
    fs.close()
    raw.close()


def test_undecodable_obj_payload(pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = pair
    a.send(MsgType.REQUEST, b"\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(ProtocolError) as ei:
        b.recv_obj(WAIT)
    assert ei.value.reason == "BAD_PAYLOAD"


# -- compression ------------------------------------------------------------------------------


def test_get_codec_names_and_levels() -> None:
    assert get_codec("none") is None
    assert get_codec(None) is None
    assert get_codec("zlib") == Codec("zlib", 6)
    assert get_codec("ZSTD", 19) == Codec("zstd", 19)
    assert set(available_codecs()) == {"zlib", "zstd"}
    for name, level in [("zlib", 0), ("zlib", 10), ("zstd", 20), ("lz4", 1), ("zlib", True)]:
        with pytest.raises(CompressionError) as ei:
            get_codec(name, level)  # type: ignore[arg-type]
        assert ei.value.code == -153


@pytest.mark.parametrize("name, level", [("zlib", 1), ("zlib", 9), ("zstd", 1), ("zstd", 19)])
def test_compressed_roundtrip_and_stats(
    authed_pair: tuple[FrameSocket, FrameSocket], name: str, level: int
) -> None:
    a, b = authed_pair
    codec = get_codec(name, level)
    payload = b"replicated text line\n" * 5000
    wire = a.send(MsgType.OPS, payload, compress=codec)
    assert wire < len(payload) // 10
    assert b.recv(WAIT) == (MsgType.OPS, payload)
    sa, sb = a.stats(), b.stats()
    assert sa.bytes_sent_raw == HEADER.size + len(payload)
    assert sa.bytes_sent_wire == wire
    assert (sb.bytes_received_raw, sb.bytes_received_wire) == (sa.bytes_sent_raw, wire)
    assert (sa.frames_sent, sb.frames_received) == (1, 1)


def test_incompressible_data_goes_uncompressed(
    authed_pair: tuple[FrameSocket, FrameSocket],
) -> None:
    a, b = authed_pair
    payload = os.urandom(100_000)
    wire = a.send(MsgType.OPS, payload, compress=get_codec("zstd", 3))
    assert wire == HEADER.size + len(payload)
    assert b.recv(WAIT) == (MsgType.OPS, payload)
    assert a.stats().bytes_sent_raw == a.stats().bytes_sent_wire


def test_stats_equal_without_compression(authed_pair: tuple[FrameSocket, FrameSocket]) -> None:
    a, b = authed_pair
    a.send(MsgType.OPS, b"z" * 10_000)
    b.recv(WAIT)
    s = a.stats()
    assert s.bytes_sent_raw == s.bytes_sent_wire == HEADER.size + 10_000


@pytest.mark.parametrize("name", ["zlib", "zstd"])
def test_decompression_bomb_refused(name: str) -> None:
    codec = get_codec(name, 1)
    assert codec is not None
    bomb = codec.compress(b"\x00" * (50 * 1024 * 1024))
    raw, peer = socket.socketpair()
    fs = FrameSocket(peer, stall_timeout=WAIT)
    fs.mark_authenticated(max_frame=1024 * 1024)
    # The header tells the truth about the wire length but lies about the raw length.
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.OPS, codec.id, 0, len(bomb), 1000)
    sender = Runner(lambda: raw.sendall(header + bomb))
    with pytest.raises(CompressionError):
        fs.recv(WAIT)
    assert sender.join().error is None
    fs.close()
    raw.close()


def test_decompress_checks_exact_size() -> None:
    codec = codec_by_id(1)
    assert codec is not None
    data = codec.compress(b"a" * 1000)
    assert codec.decompress(data, 1000) == b"a" * 1000
    with pytest.raises(CompressionError):
        codec.decompress(data, 999)
    with pytest.raises(CompressionError):
        codec.decompress(data, 1001)
    with pytest.raises(CompressionError):
        codec.decompress(b"not zlib at all", 10)
    with pytest.raises(CompressionError):
        codec_by_id(7)


# -- key files --------------------------------------------------------------------------------


def test_keygen_mode_and_format(tmp_path: Any) -> None:
    path = str(tmp_path / "cluster.key")
    old = os.umask(0o022)
    try:
        generate_key_file(path)
    finally:
        os.umask(old)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    with open(path) as f:
        text = f.read()
    assert len(text) == 65 and text.endswith("\n")
    assert text[:-1] == text[:-1].lower()
    key = load_key(path)
    assert key == bytes.fromhex(text[:-1]) and len(key) == 32
    assert os.listdir(tmp_path) == ["cluster.key"]  # no temp file left behind


def test_keygen_refuses_overwrite_unless_forced(tmp_path: Any) -> None:
    path = str(tmp_path / "cluster.key")
    generate_key_file(path)
    first = load_key(path)
    with pytest.raises(KeyFileError) as ei:
        generate_key_file(path)
    assert ei.value.reason == "KEY_EXISTS"
    assert load_key(path) == first
    generate_key_file(path, force=True)
    assert load_key(path) != first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["cluster.key"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620])
def test_load_key_refuses_open_permissions(tmp_path: Any, mode: int) -> None:
    path = str(tmp_path / "cluster.key")
    generate_key_file(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as ei:
        load_key(path)
    assert ei.value.reason == "KEY_PERMISSIONS"
    assert path in str(ei.value) and f"chmod 600 {path}" in str(ei.value)
    assert isinstance(ei.value, AuthError)


def test_load_key_missing_and_malformed(tmp_path: Any) -> None:
    path = str(tmp_path / "absent.key")
    with pytest.raises(KeyFileError) as ei:
        load_key(path)
    assert ei.value.reason == "KEY_MISSING" and path in str(ei.value)
    for text in ["", "abc\n", "A" * 64 + "\n", "g" * 64 + "\n", "0" * 64 + "\n\n", "0" * 63]:
        with pytest.raises(KeyFileError):
            parse_key(text)
    assert parse_key("0f" * 32 + "\n") == b"\x0f" * 32
    assert parse_key("0f" * 32) == b"\x0f" * 32


# -- handshake -------------------------------------------------------------------------------


def _handshake(
    pair: tuple[FrameSocket, FrameSocket], client_key: bytes | None, server_key: bytes | None
) -> tuple[Runner, Runner]:
    client_fs, server_fs = pair
    server = Runner(lambda: server_handshake(server_fs, server_key, node_id="tgt", info={"s": 1}))
    client = Runner(
        lambda: client_handshake(client_fs, client_key, node_id="src", info={"role": "source"})
    )
    return client.join(), server.join()


def test_handshake_success(pair: tuple[FrameSocket, FrameSocket]) -> None:
    client, server = _handshake(pair, KEY, KEY)
    assert client.error is None and server.error is None
    assert client.result == PeerInfo("tgt", PROTOCOL_VERSION, {"s": 1})
    assert server.result == PeerInfo("src", PROTOCOL_VERSION, {"role": "source"})
    a, b = pair
    assert a.authenticated and b.authenticated
    assert a.max_frame == b.max_frame == POST_AUTH_MAX_FRAME
    a.send(MsgType.OPS, b"x" * 100_000)
    assert b.recv(WAIT)[1] == b"x" * 100_000


def test_key_never_on_the_wire() -> None:
    """Record both directions of a successful handshake and look for the key."""
    c1, c2 = socket.socketpair()
    s1, s2 = socket.socketpair()
    captured = bytearray()

    def relay(src: socket.socket, dst: socket.socket) -> None:
        while chunk := src.recv(65536):
            captured.extend(chunk)
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)

    relays = [Runner(lambda: relay(c2, s1)), Runner(lambda: relay(s1, c2))]
    client_fs, server_fs = FrameSocket(c1, stall_timeout=WAIT), FrameSocket(s2, stall_timeout=WAIT)
    client, server = _handshake((client_fs, server_fs), KEY, KEY)
    assert client.error is None and server.error is None
    client_fs.close()
    server_fs.close()
    for r in relays:
        r.join()
    c2.close()
    s1.close()
    assert len(captured) > 100
    assert KEY not in captured and KEY.hex().encode() not in captured


def test_wrong_key_refused_both_ways(pair: tuple[FrameSocket, FrameSocket]) -> None:
    client, server = _handshake(pair, OTHER_KEY, KEY)
    assert isinstance(server.error, AuthError)
    assert isinstance(client.error, AuthError)
    assert client.error.code == server.error.code == -138
    assert pair[0].closed and pair[1].closed
    assert not pair[1].authenticated


def test_client_without_key_refuses_to_start(pair: tuple[FrameSocket, FrameSocket]) -> None:
    client_fs, _ = pair
    with pytest.raises(AuthError):
        client_handshake(client_fs, None, node_id="src", info={})
    assert client_fs.closed


def test_server_without_key_refuses_everyone(pair: tuple[FrameSocket, FrameSocket]) -> None:
    client, server = _handshake(pair, KEY, None)
    assert isinstance(server.error, AuthError)
    assert isinstance(client.error, AuthError)


def test_client_checks_server_proof(pair: tuple[FrameSocket, FrameSocket]) -> None:
    """A fake server that accepts any proof cannot fool the client."""
    client_fs, fake = pair

    def impostor() -> None:
        fake.recv(WAIT)
        fake.send_obj(
            MsgType.CHALLENGE, {"proto": PROTOCOL_VERSION, "node_id": "evil", "nonce": b"n" * 32}
        )
        fake.recv(WAIT)
        info = msgpack.packb({}, use_bin_type=True)
        fake.send_obj(MsgType.AUTH_OK, {"proof": b"\x00" * 32, "info": info})

    runner = Runner(impostor)
    with pytest.raises(AuthError):
        client_handshake(client_fs, KEY, node_id="src", info={})
    assert runner.join().error is None
    assert not client_fs.authenticated


def test_replayed_auth_is_refused() -> None:
    """A recorded client AUTH does not validate against a fresh server nonce."""
    recorded: dict[str, bytes] = {}
    a, b = socket.socketpair()
    client_fs, server_fs = FrameSocket(a, stall_timeout=WAIT), FrameSocket(b, stall_timeout=WAIT)
    orig_send = client_fs.send

    def spy(mtype: MsgType, payload: bytes, **kw: Any) -> int:
        recorded[mtype.name] = payload
        return orig_send(mtype, payload, **kw)

    client_fs.send = spy  # type: ignore[method-assign]
    client, server = _handshake((client_fs, server_fs), KEY, KEY)
    assert client.error is None and server.error is None
    client_fs.close()
    server_fs.close()

    # Attacker replays HELLO then AUTH against a new server session.
    a, b = socket.socketpair()
    attacker, server_fs = FrameSocket(a, stall_timeout=WAIT), FrameSocket(b, stall_timeout=WAIT)
    server = Runner(lambda: server_handshake(server_fs, KEY, node_id="tgt"))
    attacker.send(MsgType.HELLO, recorded["HELLO"])
    assert attacker.recv(WAIT)[0] is MsgType.CHALLENGE
    attacker.send(MsgType.AUTH, recorded["AUTH"])
    mtype, obj = attacker.recv_obj(WAIT)
    assert mtype is MsgType.ERROR and obj["code"] == -138
    assert isinstance(server.join().error, AuthError)
    with pytest.raises(ConnectionClosed):
        attacker.recv(WAIT)
    attacker.close()


def test_data_before_auth_refused(pair: tuple[FrameSocket, FrameSocket]) -> None:
    client_fs, server_fs = pair
    server = Runner(lambda: server_handshake(server_fs, KEY, node_id="tgt"))
    client_fs.send_obj(MsgType.OPS, [Op(OpKind.MKDIR, "x").to_wire()])
    mtype, obj = client_fs.recv_obj(WAIT)
    assert mtype is MsgType.ERROR and obj["code"] == -138
    assert isinstance(server.join().error, AuthError)
    assert server_fs.closed


def test_ops_instead_of_auth_refused(pair: tuple[FrameSocket, FrameSocket]) -> None:
    client_fs, server_fs = pair
    server = Runner(lambda: server_handshake(server_fs, KEY, node_id="tgt"))
    client_fs.send_obj(
        MsgType.HELLO,
        {
            "proto": [PROTOCOL_VERSION, PROTOCOL_VERSION],
            "node_id": "x",
            "nonce": b"n" * 32,
            "info": {},
        },
    )
    assert client_fs.recv(WAIT)[0] is MsgType.CHALLENGE
    client_fs.send_obj(MsgType.OPS, [])
    mtype, obj = client_fs.recv_obj(WAIT)
    assert mtype is MsgType.ERROR and obj["reason"] == "AUTH_FAILED"
    assert isinstance(server.join().error, AuthError)


def test_handshake_timeout_is_bounded(pair: tuple[FrameSocket, FrameSocket]) -> None:
    _, server_fs = pair
    with pytest.raises(AuthError) as ei:
        server_handshake(server_fs, KEY, node_id="tgt", timeout=0.1)
    assert ei.value.reason == "AUTH_TIMEOUT"
    assert server_fs.closed


def test_version_range_mismatch_reports_157(pair: tuple[FrameSocket, FrameSocket]) -> None:
    client_fs, server_fs = pair
    server = Runner(lambda: server_handshake(server_fs, KEY, node_id="tgt"))
    client_fs.send_obj(
        MsgType.HELLO,
        {
            "proto": [PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2],
            "node_id": "new",
            "nonce": b"n" * 32,
            "info": {},
        },
    )
    mtype, obj = client_fs.recv_obj(WAIT)
    assert mtype is MsgType.ERROR
    assert obj["code"] == -157 and obj["reason"] == "VERSION_MISMATCH"
    err = server.join().error
    assert isinstance(err, VersionError) and err.code == -157


def test_header_version_mismatch_reports_157() -> None:
    """A future peer (next header version) gets an ERROR -157 it can still parse."""
    a, b = socket.socketpair()
    nxt = PROTOCOL_VERSION + 1
    future = FrameSocket(a, stall_timeout=WAIT, version=nxt)
    server_fs = FrameSocket(b, stall_timeout=WAIT)
    server = Runner(lambda: server_handshake(server_fs, KEY, node_id="tgt"))
    future.send_obj(MsgType.HELLO, {"proto": [nxt, nxt], "node_id": "new", "nonce": b"n" * 32})
    # The future peer reads our frame by hand: magic, version, then our layout.
    raw = b""
    while len(raw) < HEADER.size:
        chunk = a.recv(HEADER.size - len(raw))
        assert chunk
        raw += chunk
    magic, version, mtype, _, _, wire_len, _ = HEADER.unpack(raw)
    assert (magic, version, mtype) == (MAGIC, PROTOCOL_VERSION, MsgType.ERROR)
    body = b""
    while len(body) < wire_len:
        body += a.recv(wire_len - len(body))
    assert msgpack.unpackb(body)["code"] == -157
    err = server.join().error
    assert isinstance(err, VersionError) and err.peer_version == nxt
    future.close()


def test_client_sees_version_error_code() -> None:
    a, b = socket.socketpair()
    client_fs, old_server = FrameSocket(a, stall_timeout=WAIT), FrameSocket(b, stall_timeout=WAIT)

    def refuse() -> None:
        old_server.recv(WAIT)
        old_server.send_error(-157, "VERSION_MISMATCH", "speaks 0 only")

    runner = Runner(refuse)
    with pytest.raises(VersionError) as ei:
        client_handshake(client_fs, KEY, node_id="src", info={})
    assert ei.value.code == -157
    assert runner.join().error is None
    old_server.close()


def test_oversized_hello_refused_before_auth(pair: tuple[FrameSocket, FrameSocket]) -> None:
    client_fs, _ = pair
    with pytest.raises(FrameTooLarge):
        client_handshake(client_fs, KEY, node_id="src", info={"blob": "x" * 10_000})


def test_raw_header_struct_is_stable() -> None:
    """The wire format is a contract (docs/protocol.md): 14 bytes, magic first."""
    assert HEADER.size == 14
    assert HEADER.pack(MAGIC, 1, MsgType.ACK, 2, 0, 3, 4) == struct.pack(
        ">2sBBBBII", b"DT", 1, 7, 2, 0, 3, 4
    )
    assert [m.value for m in MsgType][:11] == list(range(1, 12))


# -- OPS_DATA frames (protocol version 2) -----------------------------------------------------


def test_ops_data_frame_round_trip_without_copies(
    authed_pair: tuple[FrameSocket, FrameSocket],
) -> None:
    from dtake.protocol.opwire import encode_ops, op_from_wire

    a, b = authed_pair
    big = os.urandom(300_000)
    ops = [
        Op(OpKind.FILE_BEGIN, "d/f", seq=1),
        Op(OpKind.WRITE, "d/f", seq=2, offset=0, data=big),
        Op(OpKind.WRITE, "d/f", seq=3, offset=len(big), data=b""),
        Op(OpKind.FILE_END, "d/f", seq=4, size=len(big), mode=0o640, tags={"qo": 7}),
        Op(OpKind.FILE_END, "s", seq=5, data=b"small", size=5, tags={"whole": 1}),
        Op(OpKind.RENAME, "d/f", seq=6, new_path="d/g"),
    ]
    sender = Runner(lambda: a.send_parts(MsgType.OPS_DATA, encode_ops(ops)))
    mtype, obj = b.recv_obj(WAIT)
    assert sender.join().error is None
    assert mtype is MsgType.OPS  # the receiver sees the same op lists as version 1
    got = [op_from_wire(item) for item in obj]
    assert isinstance(obj[1][5], memoryview)
    assert [(o.kind, o.path, o.seq, bytes(o.data), o.size, o.tags) for o in got] == [
        (o.kind, o.path, o.seq, o.data, o.size, o.tags) for o in ops
    ]
    assert b.stats().bytes_received_raw == a.stats().bytes_sent_raw


def test_ops_data_frame_compressed(authed_pair: tuple[FrameSocket, FrameSocket]) -> None:
    from dtake.protocol.opwire import encode_ops, op_from_wire

    a, b = authed_pair
    ops = [Op(OpKind.WRITE, "f", seq=1, data=b"z" * 100_000)]
    wire = a.send_parts(MsgType.OPS_DATA, encode_ops(ops), compress=get_codec("zlib", 1))
    assert wire < 10_000
    mtype, obj = b.recv_obj(WAIT)
    assert mtype is MsgType.OPS and bytes(op_from_wire(obj[0]).data) == b"z" * 100_000


def test_ops_from_wire_equals_op_from_wire_op_by_op() -> None:
    """The applier's batch decoder takes exact wire types as they are and hands every
    other op to op_from_wire (which converts or refuses it), so both agree."""
    from dtake.protocol.opwire import op_from_wire, ops_from_wire

    exact = [
        Op(OpKind.FILE_END, "d/f", seq=4, size=3, mode=0o640, uid=0, gid=0, mtime_ns=5,
           tags={"whole": 1}),
        Op(OpKind.RENAME, "a", seq=5, new_path="b"),
        Op(OpKind.SYMLINK, "l", seq=6, link="../x"),
        Op(OpKind.BARRIER, "", seq=7),
    ]  # fmt: skip
    items = [op.to_wire() for op in exact]
    items[0][5] = memoryview(b"abc")
    odd = Op(OpKind.WRITE, "w", seq=8, offset=2, data=b"zz").to_wire()
    odd[2] = True  # a bool sequence number: converted by op_from_wire
    odd[13 - 1] = None
    items.append(odd)
    got = ops_from_wire(items)
    want = [op_from_wire(list(item)) for item in items]
    assert [(o.kind, o.path, o.seq, o.new_path, o.offset, bytes(o.data), o.size, o.mode,
             o.uid, o.gid, o.mtime_ns, o.link, o.tags) for o in got] == [
        (o.kind, o.path, o.seq, o.new_path, o.offset, bytes(o.data), o.size, o.mode,
         o.uid, o.gid, o.mtime_ns, o.link, o.tags) for o in want
    ]  # fmt: skip
    assert isinstance(got[0].data, memoryview)  # no copy of the frame's data
    assert got[0].kind is OpKind.FILE_END and got[4].seq == 1
    for bad in (
        [99, "p", 1, None, 0, b"", None, None, None, None, None, None, None],  # no such kind
        [4, "p", 1, None, 0, "text", None, None, None, None, None, None, None],  # str data
        [4, "p", 1],  # short
    ):
        with pytest.raises(ValueError):
            ops_from_wire([items[1], bad])


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no header length
        b"\x00\x00\x00\x10" + b"\x90",  # header longer than the frame
        b"\x00\x00\x00\x01" + b"\xc1",  # undecodable header
        b"\x00\x00\x00\x01" + b"\x80",  # not a list
        b"\x00\x00\x00\x02" + b"\x91\x01",  # an op that is not a 13-field list
    ],
)
def test_ops_data_malformed_is_protocol_error(
    authed_pair: tuple[FrameSocket, FrameSocket], payload: bytes
) -> None:
    a, b = authed_pair
    a.send(MsgType.OPS_DATA, payload)
    with pytest.raises(ProtocolError) as ei:
        b.recv_obj(WAIT)
    assert ei.value.reason == "BAD_PAYLOAD"


def test_ops_data_lengths_must_cover_the_trailer(
    authed_pair: tuple[FrameSocket, FrameSocket],
) -> None:
    from dtake.protocol.opwire import encode_ops

    a, b = authed_pair
    parts = encode_ops([Op(OpKind.WRITE, "f", seq=1, data=b"abc")])
    a.send(MsgType.OPS_DATA, bytes(parts[0]) + b"abcEXTRA")  # trailing bytes
    with pytest.raises(ProtocolError):
        b.recv_obj(WAIT)

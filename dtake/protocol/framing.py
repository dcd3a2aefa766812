"""Length-prefixed, versioned frames over a connected blocking TCP socket.

Frame = 14-byte header + payload::

    offset size  field
    0      2     magic b"DT"
    2      1     protocol version (PROTOCOL_VERSION)
    3      1     message type (MsgType)
    4      1     flags: low 4 bits = codec id (0 none, 1 zlib, 2 zstd); high bits 0
    5      1     reserved, 0
    6      4     wire length: payload bytes that follow (big-endian)
    10     4     raw length: payload bytes after decompression (== wire length if none)

Magic and version stay at offsets 0-2 in every future version, so a peer can always tell
"not dtake" (ProtocolError) from "another dtake version" (VersionError, -157 [L4382]).
Both lengths are checked against the connection's limit before anything is allocated:
4 KiB until the handshake succeeds (an unauthenticated peer cannot make us buffer data),
64 MiB afterwards.

The daemon uses threads and blocking sockets (baselines §5: blocking sendall is ~9x faster
than asyncio streams on loopback). ``send`` may be called from several threads (a lock
keeps frames whole); ``recv`` is meant for one reader thread (it has a lock too).
"""

from __future__ import annotations

import enum
import select
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

import msgpack

from dtake.protocol.compress import Codec, codec_by_id
from dtake.protocol.errors import (
    AuthError,
    CompressionError,
    ConnectionClosed,
    FrameTooLarge,
    ProtocolError,
    VersionError,
)

__all__ = [
    "HEADER",
    "MAGIC",
    "POST_AUTH_MAX_FRAME",
    "PRE_AUTH_MAX_FRAME",
    "PROTOCOL_VERSION",
    "FrameSocket",
    "FrameStats",
    "MsgType",
    "error_from_payload",
]

# 2: OPS_DATA frames (op data as a raw trailer, dtake.protocol.opwire); cumulative ACKs.
PROTOCOL_VERSION = 2
MAGIC = b"DT"
HEADER = struct.Struct(">2sBBBBII")
PRE_AUTH_MAX_FRAME = 4 * 1024
POST_AUTH_MAX_FRAME = 64 * 1024 * 1024
# Compressing tiny frames (acks, pings) costs CPU and saves nothing.
MIN_COMPRESS = 256
DEFAULT_STALL_TIMEOUT = 60.0


class MsgType(enum.IntEnum):
    HELLO = 1  # client -> server: versions, node id, client nonce, info
    CHALLENGE = 2  # server -> client: server node id, server nonce
    AUTH = 3  # client -> server: client proof (HMAC)
    AUTH_OK = 4  # server -> client: server proof (HMAC)
    ERROR = 5  # either way: {"code", "reason", "message"}; the sender then closes
    OPS = 6  # source -> target: a batch of ops (Op.to_wire lists)
    ACK = 7  # target -> source: highest applied sequence number
    REQUEST = 8  # either way: {"id", "cmd", ...} (mirror compare, verify, stats)
    RESPONSE = 9  # answer to REQUEST with the same "id"
    PING = 10  # keepalive / liveness probe
    PONG = 11
    BYE = 12  # orderly shutdown: the sender closes after this
    OPS_DATA = 13  # source -> target: ops with their data as a raw trailer (opwire.py)


@dataclass(frozen=True, slots=True)
class FrameStats:
    """Byte counters; raw = before compression, wire = on the wire (both include headers).

    They feed the seed's "Sent Compressed (Bytes)" next to the uncompressed counters
    [L5569-5583]; when compression is off the two are equal.
    """

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent_raw: int = 0
    bytes_sent_wire: int = 0
    bytes_received_raw: int = 0
    bytes_received_wire: int = 0


_ERROR_CLASSES: dict[str, type[ProtocolError]] = {
    "AUTH_FAILED": AuthError,
    "VERSION_MISMATCH": VersionError,
    "COMPRESSION": CompressionError,
    "FRAME_TOO_LARGE": FrameTooLarge,
}


def error_from_payload(obj: Any) -> ProtocolError:
    """Rebuild the exception a peer reported in an ERROR frame."""
    if not isinstance(obj, dict):
        return ProtocolError("peer sent a malformed ERROR frame", reason="BAD_PAYLOAD")
    code = obj.get("code")
    reason = obj.get("reason")
    message = obj.get("message")
    cls = _ERROR_CLASSES.get(str(reason), ProtocolError)
    return cls(
        f"peer refused: {message}" if isinstance(message, str) else "peer refused",
        code=code if isinstance(code, int) else None,
        reason=reason if isinstance(reason, str) else None,
    )


class FrameSocket:
    """A connected blocking socket speaking dtake frames.

    ``stall_timeout`` bounds every single send/receive system call once a frame has
    started (a dead peer cannot hang a thread); waiting for the *next* frame is bounded
    only by ``recv(timeout=...)``.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_frame: int = PRE_AUTH_MAX_FRAME,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self._sock = sock
        self._sock.settimeout(stall_timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Acks and pings are tiny; Nagle would hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.max_frame = max_frame
        self.authenticated = False
        self._version = version  # only tests send another version
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats = FrameStats()
        self._closed = False
        self._broken: str | None = None
        self._recv_broken: str | None = None

    # -- state ---------------------------------------------------------------------------

    def mark_authenticated(self, *, max_frame: int = POST_AUTH_MAX_FRAME) -> None:
        """Called by the handshake: lift the pre-auth frame limit."""
        self.authenticated = True
        self.max_frame = max_frame

    def stats(self) -> FrameStats:
        with self._stats_lock:
            return self._stats

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def close(self) -> None:
        """Idempotent; a shutdown first wakes a thread blocked in ``recv``."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> FrameSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_usable(self, *, receiving: bool = False) -> None:
        if self._closed:
            raise ConnectionClosed("connection is closed")
        if self._broken is not None:
            raise ProtocolError(f"connection is unusable: {self._broken}", reason="BROKEN")
        if receiving and self._recv_broken is not None:
            raise ProtocolError(f"connection is unusable: {self._recv_broken}", reason="BROKEN")

    def _break(self, why: str) -> None:
        # A half-read or half-written frame desynchronises the stream for good.
        self._broken = why
        self.close()

    def _break_recv(self, why: str) -> None:
        # A bad header: nothing more can be read, but our sending side is still in step,
        # so the caller can answer with an ERROR frame (e.g. -157) before closing.
        self._recv_broken = why

    # -- sending -------------------------------------------------------------------------

    def send(self, mtype: MsgType, payload: bytes, *, compress: Codec | None = None) -> int:
        """Send one frame; returns the bytes it took on the wire (header included)."""
        self._check_usable()
        raw_len = len(payload)
        if raw_len > self.max_frame:
            raise FrameTooLarge(f"frame of {raw_len} bytes exceeds the limit of {self.max_frame}")
        body: bytes | memoryview = payload
        codec_id = 0
        if compress is not None and raw_len >= MIN_COMPRESS:
            packed = compress.compress(payload)
            # Incompressible data goes as is: the receiver never pays for a useless codec.
            if len(packed) < raw_len:
                body, codec_id = packed, compress.id
        header = HEADER.pack(MAGIC, self._version, int(mtype), codec_id, 0, len(body), raw_len)
        with self._send_lock:
            self._check_usable()
            try:
                self._sendv(header, body)
            except OSError as exc:
                self._break(f"send failed: {exc}")
                raise ProtocolError(f"send failed: {exc}", reason="SEND_FAILED") from exc
        wire = HEADER.size + len(body)
        with self._stats_lock:
            s = self._stats
            self._stats = FrameStats(
                s.frames_sent + 1,
                s.frames_received,
                s.bytes_sent_raw + HEADER.size + raw_len,
                s.bytes_sent_wire + wire,
                s.bytes_received_raw,
                s.bytes_received_wire,
            )
        return wire

    def send_parts(
        self, mtype: MsgType, parts: list[bytes | memoryview], *, compress: Codec | None = None
    ) -> int:
        """Send one frame whose payload is ``parts`` joined, without joining them (one
        gather-write); compressed frames are joined first. Returns the wire bytes."""
        raw_len = sum(map(len, parts))
        if compress is not None and raw_len >= MIN_COMPRESS:
            return self.send(mtype, b"".join(parts), compress=compress)
        self._check_usable()
        if raw_len > self.max_frame:
            raise FrameTooLarge(f"frame of {raw_len} bytes exceeds the limit of {self.max_frame}")
        header = HEADER.pack(MAGIC, self._version, int(mtype), 0, 0, raw_len, raw_len)
        with self._send_lock:
            self._check_usable()
            try:
                if raw_len <= 64 * 1024:
                    self._sock.sendall(b"".join([header, *parts]))
                else:
                    self._sendmsg_all([header, *parts])
            except OSError as exc:
                self._break(f"send failed: {exc}")
                raise ProtocolError(f"send failed: {exc}", reason="SEND_FAILED") from exc
        wire = HEADER.size + raw_len
        with self._stats_lock:
            s = self._stats
            self._stats = FrameStats(
                s.frames_sent + 1,
                s.frames_received,
                s.bytes_sent_raw + wire,
                s.bytes_sent_wire + wire,
                s.bytes_received_raw,
                s.bytes_received_wire,
            )
        return wire

    def _sendv(self, header: bytes, body: bytes | memoryview) -> None:
        if len(body) <= 64 * 1024:
            self._sock.sendall(header + bytes(body))
            return
        # Large payloads: gather-write, no copy of the payload.
        self._sendmsg_all([memoryview(header), memoryview(body)])

    def _sendmsg_all(self, views: list[bytes | memoryview]) -> None:
        """Gather-write every buffer (bytes or 1-D byte views), in pieces of at most 512
        (IOV_MAX is 1024): one sendmsg per piece unless the kernel takes less."""
        i = 0
        while i < len(views):
            piece = views[i : i + 512]
            n = self._sock.sendmsg(piece)
            if n == sum(map(len, piece)):
                i += len(piece)
                continue
            while n >= len(views[i]):  # a short send: skip what went, cut the first left
                n -= len(views[i])
                i += 1
            views[i] = memoryview(views[i])[n:]

    def send_obj(self, mtype: MsgType, obj: Any, *, compress: Codec | None = None) -> int:
        """Send a msgpack-encoded object (bytes stay bytes: ``use_bin_type``)."""
        return self.send(mtype, msgpack.packb(obj, use_bin_type=True), compress=compress)

    def send_error(self, code: int, reason: str, message: str) -> None:
        """Best-effort ERROR frame before closing; a peer that already left is fine."""
        try:
            self.send_obj(MsgType.ERROR, {"code": code, "reason": reason, "message": message})
        except (ProtocolError, OSError):
            pass

    # -- receiving -----------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> tuple[MsgType, bytes]:
        """Wait up to ``timeout`` seconds (None: forever) for the next frame.

        Raises TimeoutError if no frame *started* in time (the stream is still usable),
        ConnectionClosed on a clean close between frames, ProtocolError otherwise: after
        an I/O failure the connection is closed; after a bad header or payload only
        receiving stops, so the caller may still ``send_error`` -- then it must ``close``.
        """
        mtype, payload = self._recv_payload(timeout)
        return mtype, bytes(payload)

    def _recv_payload(self, timeout: float | None) -> tuple[MsgType, bytes | bytearray]:
        """``recv`` without the final copy: an uncompressed payload stays the bytearray it
        was received into (msgpack decodes it as is; saves a memcpy per data byte)."""
        with self._recv_lock:
            self._check_usable(receiving=True)
            if timeout is not None and not self._wait_readable(timeout):
                raise TimeoutError("no frame received in time")
            header = bytearray(HEADER.size)
            got = self._recv_exact(memoryview(header), first=True)
            if got == 0:
                self.close()
                raise ConnectionClosed("peer closed the connection")
            magic, version, mtype_raw, flags, reserved, wire_len, raw_len = HEADER.unpack(header)
            try:
                if magic != MAGIC:
                    raise ProtocolError("not a dtake peer (bad frame magic)", reason="BAD_MAGIC")
                if version != PROTOCOL_VERSION:
                    raise VersionError(
                        f"peer speaks protocol version {version}, this node {PROTOCOL_VERSION}",
                        peer_version=version,
                    )
                try:
                    mtype = MsgType(mtype_raw)
                except ValueError:
                    raise ProtocolError(
                        f"unknown message type {mtype_raw}", reason="BAD_TYPE"
                    ) from None
                if flags & 0xF0 or reserved:
                    raise ProtocolError("reserved header bits are set", reason="BAD_HEADER")
                codec_id = flags & 0x0F
                if raw_len > self.max_frame or wire_len > self.max_frame:
                    raise FrameTooLarge(
                        f"peer announced a {max(raw_len, wire_len)}-byte frame; limit is "
                        f"{self.max_frame}"
                        + ("" if self.authenticated else " before authentication")
                    )
                if codec_id == 0 and wire_len != raw_len:
                    raise ProtocolError("uncompressed frame with two lengths", reason="BAD_HEADER")
                codec = codec_by_id(codec_id)
            except ProtocolError as exc:
                self._break_recv(str(exc))
                raise
            body = bytearray(wire_len)
            if wire_len:
                self._recv_exact(memoryview(body), first=False)
            try:
                payload: bytes | bytearray = (
                    body if codec is None else codec.decompress(body, raw_len)
                )
            except ProtocolError as exc:
                self._break_recv(str(exc))
                raise
        with self._stats_lock:
            s = self._stats
            self._stats = FrameStats(
                s.frames_sent,
                s.frames_received + 1,
                s.bytes_sent_raw,
                s.bytes_sent_wire,
                s.bytes_received_raw + HEADER.size + raw_len,
                s.bytes_received_wire + HEADER.size + wire_len,
            )
        return mtype, payload

    def recv_obj(self, timeout: float | None = None) -> tuple[MsgType, Any]:
        """``recv`` plus msgpack decoding; undecodable payloads are a ProtocolError.

        An OPS_DATA frame is returned as an OPS frame (the same op lists, their data
        fields memoryviews of the received payload: dtake.protocol.opwire)."""
        mtype, payload = self._recv_payload(timeout)
        if mtype == MsgType.OPS_DATA:
            from dtake.protocol.opwire import decode_ops

            try:
                return MsgType.OPS, decode_ops(payload)
            except ProtocolError as exc:
                self._break_recv(str(exc))
                raise
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            self._break_recv(f"undecodable payload: {exc}")
            raise ProtocolError(
                f"undecodable {mtype.name} payload: {exc}", reason="BAD_PAYLOAD"
            ) from exc
        return mtype, obj

    def _wait_readable(self, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(max(0.0, timeout) * 1000.0))

    def _recv_exact(self, view: memoryview, *, first: bool) -> int:
        """Fill ``view``; returns 0 only for a clean EOF before the first byte of a frame."""
        got = 0
        total = len(view)
        while got < total:
            try:
                n = self._sock.recv_into(view[got:])
            except TimeoutError as exc:
                if first and got == 0:
                    # recv(timeout=None) waits forever for a frame to start.
                    continue
                self._break("peer stalled mid-frame")
                raise ProtocolError("peer stalled mid-frame", reason="STALLED") from exc
            except OSError as exc:
                self._break(f"receive failed: {exc}")
                raise ProtocolError(f"receive failed: {exc}", reason="RECV_FAILED") from exc
            if n == 0:
                if first and got == 0:
                    return 0
                self._break("peer closed mid-frame")
                raise ProtocolError("peer closed the connection mid-frame", reason="TRUNCATED")
            got += n
        return got

"""Shared cluster key and mutual challenge-response authentication of peers.

The installer gives every node of a cluster the same 32-byte key (a file of 64 lowercase
hex characters and a newline, mode 0600). Peers prove knowledge of the key without sending
it (DESIGN §2 "Peers authenticate")::

    client                                   server
    HELLO     {proto:[min,max], node_id, nonce_c, info}  ->
                                          <- CHALLENGE {proto, node_id, nonce_s}
    AUTH      {proof: HMAC(key, "client" | T)}           ->
                                          <- AUTH_OK   {proof: HMAC(key, "server" | T | info), info}

``T`` = SHA-256 over the exact HELLO and CHALLENGE payload bytes, so each proof covers both
fresh nonces, both node ids, the versions and the client's info: a recorded AUTH is useless
against a new server nonce (no replay), and the role label stops a proof being reflected
back at its sender. The client proves first, so a peer without the key learns nothing but
a random nonce; on a wrong proof the server sends one ERROR frame (-138 [L4363]) and closes
without reading anything else. Frames stay limited to 4 KiB until AUTH succeeds.

A protocol version outside our range is refused with an ERROR frame carrying -157
"Incompatible source and target Double-Take Availability versions" [L4382].

Not covered: the stream after authentication is neither encrypted nor MACed per frame.
Replication networks should be private (or run over WireGuard/IPsec), as with the seed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dtake.protocol.errors import (
    AuthError,
    KeyFileError,
    ProtocolError,
    VersionError,
)
from dtake.protocol.framing import PROTOCOL_VERSION, FrameSocket, MsgType, error_from_payload

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "KEY_BYTES",
    "MIN_PROTOCOL_VERSION",
    "PeerInfo",
    "client_handshake",
    "generate_key_file",
    "load_key",
    "parse_key",
    "server_handshake",
]

KEY_BYTES = 32
NONCE_BYTES = 32
# Oldest protocol version this build can speak; HELLO offers [MIN, PROTOCOL_VERSION].
# Frames carry the version and are checked strictly, so a build speaks only its own.
MIN_PROTOCOL_VERSION = 2
# An unauthenticated peer may hold a server thread this long per handshake step.
HANDSHAKE_TIMEOUT = 10.0
_LABEL = b"dtake-auth-v1"
_KEY_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The authenticated peer: its node id, the protocol version in use, its info dict."""

    node_id: str
    version: int
    info: dict[str, Any] = field(default_factory=dict)


# -- key file ---------------------------------------------------------------------------


def generate_key_file(path: str, *, force: bool = False) -> None:
    """Write a new random key to ``path`` with mode 0600, atomically.

    The file is complete and 0600 from the moment the name exists (written to a temp file
    created 0600 in the same directory, then linked or renamed into place). An existing
    file is kept unless ``force`` (a new key locks out every node still holding the old one).
    """
    path = os.path.abspath(path)
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp-{secrets.token_hex(6)}")
    text = (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode("ascii")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise KeyFileError(
            f"cannot create cluster key file in {directory}: {exc.strerror}"
        ) from exc
    try:
        try:
            os.fchmod(fd, 0o600)  # O_CREAT modes pass through the umask; be explicit
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            try:
                # link() fails if the name exists: no window where we could overwrite.
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(
                    f"cluster key file {path} already exists; refusing to overwrite it "
                    "(use --force to replace it on every node)",
                    reason="KEY_EXISTS",
                ) from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def parse_key(text: str, *, where: str = "key") -> bytes:
    """Decode key file content: 64 lowercase hex characters, optional trailing newline."""
    body = text[:-1] if text.endswith("\n") else text
    if not _KEY_RE.fullmatch(body):
        raise KeyFileError(
            f"{where} is not a dtake cluster key (expected 64 lowercase hex characters and a "
            "newline; create one with: dtake keygen FILE)"
        )
    return bytes.fromhex(body)


def load_key(path: str) -> bytes:
    """Read the cluster key, refusing a file that group or others can access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(
            f"cluster key file {path} does not exist (create it with: dtake keygen {path})",
            reason="KEY_MISSING",
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot open cluster key file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"cluster key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"cluster key file {path} is accessible by group/others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
                reason="KEY_PERMISSIONS",
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return parse_key(text, where=f"cluster key file {path}")


# -- handshake --------------------------------------------------------------------------


def _proof(key: bytes, role: bytes, hello: bytes, challenge: bytes, extra: bytes = b"") -> bytes:
    h = hashlib.sha256()
    for part in (hello, challenge, extra):
        # Length prefixes: no two different transcripts hash the same.
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return hmac.new(key, _LABEL + b"\0" + role + b"\0" + h.digest(), hashlib.sha256).digest()


def _decode_map(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed {what}: {exc}", reason="BAD_PAYLOAD") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {what}", reason="BAD_PAYLOAD")
    return obj


def _refuse(fs: FrameSocket, exc: ProtocolError) -> ProtocolError:
    """Tell the peer why (one ERROR frame), close, and hand back the exception to raise."""
    fs.send_error(exc.code, exc.reason, exc.message)
    fs.close()
    return exc


def _check_nonce(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != NONCE_BYTES:
        raise ProtocolError(f"{what} has no valid nonce", reason="BAD_PAYLOAD")
    return value


def server_handshake(
    fs: FrameSocket,
    key: bytes | None,
    *,
    node_id: str,
    info: dict[str, Any] | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> PeerInfo:
    """Authenticate the client on an accepted connection; close it on any failure.

    Returns only when the client proved knowledge of ``key``; the frame limit is then
    lifted. Raises AuthError (wrong/no key, skipped step, timeout), VersionError (-157) or
    ProtocolError; in every case the connection is closed and the peer got at most the
    challenge and one ERROR frame.
    """
    try:
        try:
            mtype, hello_raw = fs.recv(timeout)
        except TimeoutError:
            raise AuthError("peer did not say HELLO in time", reason="AUTH_TIMEOUT") from None
        if mtype is not MsgType.HELLO:
            raise AuthError(f"peer sent {mtype.name} before authenticating")
        hello = _decode_map(hello_raw, "HELLO")
        proto = hello.get("proto")
        if (
            not isinstance(proto, list)
            or len(proto) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in proto)
        ):
            raise ProtocolError("HELLO has no protocol version range", reason="BAD_PAYLOAD")
        lo, hi = proto
        if not lo <= PROTOCOL_VERSION <= hi:
            raise VersionError(
                f"peer speaks protocol versions {lo}-{hi}, this node "
                f"{MIN_PROTOCOL_VERSION}-{PROTOCOL_VERSION}",
                peer_version=hi,
            )
        peer_id = hello.get("node_id")
        peer_info = hello.get("info", {})
        if not isinstance(peer_id, str) or not isinstance(peer_info, dict):
            raise ProtocolError("HELLO has no node id", reason="BAD_PAYLOAD")
        _check_nonce(hello.get("nonce"), "HELLO")
        if not key:
            raise AuthError("this node has no cluster key configured")
        challenge_raw = msgpack.packb(
            {
                "proto": PROTOCOL_VERSION,
                "node_id": node_id,
                "nonce": secrets.token_bytes(NONCE_BYTES),
            },
            use_bin_type=True,
        )
        fs.send(MsgType.CHALLENGE, challenge_raw)
        try:
            mtype, auth_raw = fs.recv(timeout)
        except TimeoutError:
            raise AuthError(
                "peer did not answer the challenge in time", reason="AUTH_TIMEOUT"
            ) from None
        if mtype is not MsgType.AUTH:
            raise AuthError(f"peer sent {mtype.name} instead of authenticating")
        proof = _decode_map(auth_raw, "AUTH").get("proof")
        expected = _proof(key, b"client", hello_raw, challenge_raw)
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, expected):
            raise AuthError("authentication failed (wrong cluster key?)")
        info_raw = msgpack.packb(info or {}, use_bin_type=True)
        server_proof = _proof(key, b"server", hello_raw, challenge_raw, info_raw)
        fs.send_obj(MsgType.AUTH_OK, {"proof": server_proof, "info": info_raw})
    except ProtocolError as exc:
        if fs.closed:
            raise
        raise _refuse(fs, exc) from None
    fs.mark_authenticated()
    return PeerInfo(node_id=peer_id, version=PROTOCOL_VERSION, info=peer_info)


def client_handshake(
    fs: FrameSocket,
    key: bytes | None,
    *,
    node_id: str,
    info: dict[str, Any] | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> PeerInfo:
    """Authenticate to the server and check that the server knows the key too.

    Raises AuthError (the server refused us, or it could not prove it has the key),
    VersionError (-157) or ProtocolError; the connection is then closed.
    """
    if not key:
        fs.close()
        raise AuthError("this node has no cluster key configured")
    try:
        hello_raw = msgpack.packb(
            {
                "proto": [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION],
                "node_id": node_id,
                "nonce": secrets.token_bytes(NONCE_BYTES),
                "info": info or {},
            },
            use_bin_type=True,
        )
        fs.send(MsgType.HELLO, hello_raw)
        challenge_raw = _expect(fs, MsgType.CHALLENGE, timeout)
        challenge = _decode_map(challenge_raw, "CHALLENGE")
        version = challenge.get("proto")
        server_id = challenge.get("node_id")
        if not isinstance(version, int) or not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
            raise VersionError(f"server chose protocol version {version!r}", peer_version=None)
        if not isinstance(server_id, str):
            raise ProtocolError("CHALLENGE has no node id", reason="BAD_PAYLOAD")
        _check_nonce(challenge.get("nonce"), "CHALLENGE")
        fs.send_obj(MsgType.AUTH, {"proof": _proof(key, b"client", hello_raw, challenge_raw)})
        ok = _decode_map(_expect(fs, MsgType.AUTH_OK, timeout), "AUTH_OK")
        proof, info_raw = ok.get("proof"), ok.get("info")
        if not isinstance(info_raw, bytes) or not isinstance(proof, bytes):
            raise ProtocolError("malformed AUTH_OK", reason="BAD_PAYLOAD")
        expected = _proof(key, b"server", hello_raw, challenge_raw, info_raw)
        if not hmac.compare_digest(proof, expected):
            raise AuthError("the server could not prove it holds the cluster key")
        server_info = _decode_map(info_raw, "server info")
    except ProtocolError:
        fs.close()
        raise
    fs.mark_authenticated()
    return PeerInfo(node_id=server_id, version=version, info=server_info)


def _expect(fs: FrameSocket, want: MsgType, timeout: float) -> bytes:
    try:
        mtype, payload = fs.recv(timeout)
    except TimeoutError:
        raise AuthError(f"server did not send {want.name} in time", reason="AUTH_TIMEOUT") from None
    if mtype is MsgType.ERROR:
        try:
            obj: Any = msgpack.unpackb(payload, raw=False)
        except Exception:  # a garbled ERROR is still a refusal
            obj = None
        raise error_from_payload(obj)
    if mtype is not want:
        raise ProtocolError(f"expected {want.name}, got {mtype.name}", reason="UNEXPECTED")
    return payload

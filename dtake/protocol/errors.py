"""Exceptions of the peer protocol, each with the seed's numeric error code.

``code`` is the seed's error code ([L4324-4472]) so events, logs and the control API can
report it unchanged; ``reason`` is a short stable token for tests and ``--json`` output
(the seed has one code for several of our failure modes, e.g. every framing problem is
-145 "Connection failed").
"""

from __future__ import annotations

__all__ = [
    "CODE_AUTH",
    "CODE_COMPRESSION",
    "CODE_CONNECTION_FAILED",
    "CODE_INCOMPATIBLE_VERSIONS",
    "AuthError",
    "CompressionError",
    "ConnectionClosed",
    "FrameTooLarge",
    "KeyFileError",
    "ProtocolError",
    "VersionError",
]

# Seed error codes ([L4324-4472]); values match dtake.errors.E.
CODE_CONNECTION_FAILED = -145  # "Connection failed" [L4370]
CODE_AUTH = -138  # "Insufficient security access" [L4363]
CODE_COMPRESSION = (
    -153
)  # "Compression level is not supported, or server does not support compression" [L4378]
CODE_INCOMPATIBLE_VERSIONS = (
    -157
)  # "Incompatible source and target Double-Take Availability versions" [L4382]


class ProtocolError(Exception):
    """The peer broke the protocol (bad magic, garbage, oversized frame, closed mid-frame)."""

    default_code = CODE_CONNECTION_FAILED
    default_reason = "PROTOCOL"

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code: int = self.default_code if code is None else code
        self.reason: str = self.default_reason if reason is None else reason

    def __str__(self) -> str:
        return f"{self.message} (error {self.code})"


class ConnectionClosed(ProtocolError):
    """The peer closed the connection cleanly between frames."""

    default_reason = "CLOSED"


class FrameTooLarge(ProtocolError):
    """A frame header announced more bytes than this connection accepts (checked before allocating)."""

    default_reason = "FRAME_TOO_LARGE"


class AuthError(ProtocolError):
    """Peer authentication failed: wrong key, no key, or the peer skipped the handshake."""

    default_code = CODE_AUTH
    default_reason = "AUTH_FAILED"


class KeyFileError(AuthError):
    """The local cluster key file is missing, malformed or too open (a local configuration error)."""

    default_reason = "KEY_FILE"


class VersionError(ProtocolError):
    """The peer speaks a protocol version we do not support [L4382]."""

    default_code = CODE_INCOMPATIBLE_VERSIONS
    default_reason = "VERSION_MISMATCH"

    def __init__(
        self,
        message: str,
        *,
        peer_version: int | None = None,
        code: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.peer_version = peer_version


class CompressionError(ProtocolError):
    """Unknown codec or level, codec not installed, or a corrupt/oversized compressed frame [L4378]."""

    default_code = CODE_COMPRESSION
    default_reason = "COMPRESSION"

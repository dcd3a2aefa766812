"""Client for the control socket (used by the CLI, the resource agents and tests).

Socket path precedence: the ``path`` argument, then ``$DTAKE_SOCKET``, then
``/run/dtake/dtake.sock``.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from dtake.errors import DtakeError, E

__all__ = ["DEFAULT_SOCKET", "Client"]

DEFAULT_SOCKET = "/run/dtake/dtake.sock"


class Client:
    def __init__(self, path: str | None = None, *, timeout: float | None = 60.0) -> None:
        self.path = path or os.environ.get("DTAKE_SOCKET") or DEFAULT_SOCKET
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError as exc:
                s.close()
                raise DtakeError(
                    E.SERVER_NOT_RESPONDING,
                    f"cannot reach the dtake service at {self.path}: {exc.strerror or exc} "
                    "(is `dtake serve` running? set --socket or DTAKE_SOCKET)",
                ) from exc
            self._sock = s
        return self._sock

    def call(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        s = self._connect()
        if timeout is not None:
            s.settimeout(timeout)
        s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        while b"\n" not in self._buf:
            chunk = s.recv(1 << 16)
            if not chunk:
                self.close()
                raise DtakeError(
                    E.SERVER_NOT_RESPONDING, "the dtake service closed the control connection"
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        if timeout is not None:
            s.settimeout(self.timeout)
        resp = json.loads(line)
        if not resp.get("ok"):
            err = resp.get("error") or {}
            details = {k: v for k, v in err.items() if k not in ("code", "message")}
            raise DtakeError(
                int(err.get("code", E.UNKNOWN)), str(err.get("message", "error")), details
            )
        return resp.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

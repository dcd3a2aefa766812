"""Run real `dtake serve` processes side by side on one machine (tests, demo, bench).

Each service gets its own port, state directory, control socket and config file, and
all share one cluster key, so several services can run on loopback at once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from dtake.client import Client
from dtake.errors import DtakeError

__all__ = ["FakeControl", "ServiceProcess", "free_port", "tree_diff", "tree_digest"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    """One `dtake serve` in its own directory ``root``."""

    root: str
    name: str
    key_file: str
    port: int = field(default_factory=free_port)
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.root, "run", "dtake.sock")

    @property
    def config_path(self) -> str:
        return os.path.join(self.root, "dtake.yaml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "serve.log")

    def write_config(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        cfg: dict[str, Any] = {
            "port": self.port,
            "bind": "127.0.0.1",
            "node_name": self.name,
            "state_dir": os.path.join(self.root, "state"),
            "control_socket": self.socket_path,
            "auth_key_file": self.key_file,
            "reconnect_interval_s": 0.5,
            "queue": {
                "memory_max_mb": 64,
                "disk_folder": os.path.join(self.root, "state", "queue"),
            },
        }
        cfg.update(self.extra)
        with open(self.config_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg, fh)

    def start(self, *, timeout: float = 20.0) -> ServiceProcess:
        self.write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dtake.cli.main", "serve", "--config", self.config_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"dtake serve {self.name} exited {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                with Client(self.socket_path, timeout=2) as c:
                    c.call("ping")
                return self
            except DtakeError:
                time.sleep(0.05)
        raise RuntimeError(f"dtake serve {self.name} did not come up:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, *, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill9(self) -> None:
        """Pull the plug: SIGKILL, no clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> Client:
        return Client(self.socket_path)

    def call(self, cmd: str, **args: Any) -> Any:
        with self.client() as c:
            return c.call(cmd, timeout=600, **args)

    def connect_to(self, target: ServiceProcess, repset: str, target_path: str, **kw: Any) -> int:
        """Connect ``repset`` to ``target`` on loopback; the new connection's ID."""
        r = self.call(
            "connect",
            repset=repset,
            host="127.0.0.1",
            port=target.port,
            target_path=target_path,
            **kw,
        )
        return int(r["id"])


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            p = os.path.join(dirpath, name)
            yield os.path.relpath(p, root), os.lstat(p)


def tree_digest(
    root: str, *, mtimes: bool = True, dir_mtimes: bool = False
) -> dict[str, tuple[Any, ...]]:
    """Path -> (type, mode, uid, gid, size, mtime_ns, content hash / link target)."""
    out: dict[str, tuple[Any, ...]] = {}
    for rel, st in _walk(root):
        p = os.path.join(root, rel)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(p))
            continue
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) + (
                (st.st_mtime_ns,) if dir_mtimes else ()
            )
            continue
        h = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        out[rel] = (
            "f",
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns if mtimes else 0,
            h.hexdigest(),
        )
    return out


def tree_diff(a: str, b: str, **kw: Any) -> list[str]:
    """Human-readable differences between two trees (empty list = identical)."""
    da, db = tree_digest(a, **kw), tree_digest(b, **kw)
    out = []
    for k in sorted(set(da) | set(db)):
        if k not in db:
            out.append(f"only in source: {k}")
        elif k not in da:
            out.append(f"only in target: {k}")
        elif da[k] != db[k]:
            out.append(f"differs: {k}: {da[k]} != {db[k]}")
    return out


class FakeControl:
    """A scripted control socket (test double for the CLI and the resource agents).

    ``replies`` maps a command name to a result (or a callable taking the args, or a
    ``DtakeError`` to return as an error). Every request is recorded in ``requests``.
    """

    def __init__(self, path: str, replies: dict[str, Any]) -> None:
        import threading

        self.path = path
        self.replies = replies
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(8)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import json

        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as fh:
                for line in fh:
                    req = json.loads(line)
                    cmd, args = req["cmd"], req.get("args") or {}
                    self.requests.append((cmd, args))
                    reply = self.replies.get(cmd)
                    if isinstance(reply, DtakeError):
                        resp: dict[str, Any] = {"ok": False, "error": reply.to_dict()}
                    elif cmd not in self.replies:
                        resp = {
                            "ok": False,
                            "error": {"code": -102, "message": f"unscripted {cmd}"},
                        }
                    else:
                        resp = {"ok": True, "result": reply(**args) if callable(reply) else reply}
                    fh.write(json.dumps(resp).encode() + b"\n")
                    fh.flush()

    def close(self) -> None:
        self._srv.close()

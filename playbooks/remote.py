"""The seam to hosts: a small Remote interface, its Fabric implementation, and the pool.

Actions only see :class:`Remote` (run a command, put a file); unit tests hand them a
scripted one (``playbooks.testing``). The pool runs one whole per-host function per
worker (serial within a host, parallel across hosts, bounded: anchors-iac-style §2.3), with
a deadline per host, and returns one :class:`HostResult` per host without ever raising.
"""

from __future__ import annotations

import concurrent.futures as cf
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from playbooks.recap import FAILED, HostResult

__all__ = [
    "CmdResult",
    "Connector",
    "FabricRemote",
    "HostTimeout",
    "Remote",
    "RemoteCommandError",
    "Unreachable",
    "fabric_connector",
    "run_hosts",
]


@dataclass(frozen=True)
class CmdResult:
    command: str
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def tail(self, n: int = 5) -> str:
        lines = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(lines[-n:])


class Unreachable(Exception):
    """The host cannot be reached (connect, auth or transport failure)."""


class HostTimeout(Exception):
    """The host's deadline passed."""


class RemoteCommandError(Exception):
    def __init__(self, host: str, result: CmdResult) -> None:
        super().__init__(f"{host}: `{result.command}` exited {result.rc}: {result.tail()}")
        self.host = host
        self.result = result


class Remote(Protocol):
    host: str

    def run(
        self, command: str, *, timeout: float | None = None, check: bool = False
    ) -> CmdResult: ...

    def put(self, local: str, remote: str) -> None: ...

    def put_bytes(self, data: bytes, remote: str, *, mode: int = 0o600) -> None: ...

    def close(self) -> None: ...


Connector = Callable[[str], Remote]


class FabricRemote:
    """A Remote over fabric.Connection; connection problems become :class:`Unreachable`."""

    def __init__(
        self,
        host: str,
        *,
        ssh_config: str | None = None,
        user: str | None = None,
        key_filename: str | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 300.0,
        deadline: float | None = None,
    ) -> None:
        from fabric import Config, Connection

        overrides: dict[str, Any] = {"run": {"in_stream": False}}
        cfg = (
            Config(runtime_ssh_path=ssh_config, overrides=overrides)
            if ssh_config
            else Config(overrides=overrides)
        )
        kwargs: dict[str, Any] = {}
        if key_filename:
            kwargs["key_filename"] = key_filename
        self.host = host
        self.command_timeout = command_timeout
        self.deadline = deadline
        self._c = Connection(
            host, user=user, config=cfg, connect_timeout=connect_timeout, connect_kwargs=kwargs
        )
        # A ProxyCommand (e.g. the lab's relay) runs as our own process on a socketpair:
        # paramiko's ProxyCommand leaves its pipes and process behind when a connection
        # fails or closes (ResourceWarning, zombies, a kill racing the reaper).
        self._proxy_cmd: str | None = None
        if isinstance(self._c.gateway, str):
            self._proxy_cmd = _expand_proxy(host, self._c.port, self._c.gateway)
            self._c.gateway = None
        self._proxy: _Proxy | None = None
        self._opened = False

    def _open(self) -> None:
        if self._opened:
            return
        import paramiko  # type: ignore[import-untyped]

        try:
            if self._proxy_cmd is not None:
                self._proxy = _Proxy(self._proxy_cmd)
                self._c.connect_kwargs["sock"] = self._proxy.sock
            self._c.open()
        except (OSError, EOFError, paramiko.SSHException) as e:
            self.close()
            raise Unreachable(f"{type(e).__name__}: {e}".strip()) from e
        self._opened = True

    def _timeout(self, timeout: float | None) -> float:
        t = timeout if timeout is not None else self.command_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise HostTimeout("per-host timeout reached")
            t = min(t, left)
        return max(t, 1.0)

    def run(self, command: str, *, timeout: float | None = None, check: bool = False) -> CmdResult:
        from invoke.exceptions import CommandTimedOut

        self._open()
        t = self._timeout(timeout)
        try:
            r = self._c.run(command, hide=True, warn=True, timeout=t, in_stream=False)
        except CommandTimedOut as e:
            raise HostTimeout(f"`{command}` timed out after {t:.0f}s") from e
        except (OSError, EOFError) as e:
            raise Unreachable(f"{type(e).__name__}: {e}") from e
        res = CmdResult(command, int(r.exited), str(r.stdout), str(r.stderr))
        if check and not res.ok:
            raise RemoteCommandError(self.host, res)
        return res

    def put(self, local: str, remote: str) -> None:
        self._open()
        self._c.put(local, remote)

    def put_bytes(self, data: bytes, remote: str, *, mode: int = 0o600) -> None:
        """Write bytes to a remote file atomically, never readable by others in between."""
        import io

        self._open()
        tmp = f"{remote}.dtake-tmp"
        self.run(f"umask 077 && : > {shlex.quote(tmp)}", check=True)
        self._c.put(io.BytesIO(data), tmp)
        self.run(
            f"chmod {mode:o} {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(remote)}",
            check=True,
        )

    def close(self) -> None:
        try:
            self._c.close()
        except Exception:  # closing a broken transport must not turn a result into a crash
            pass
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None


def _expand_proxy(host: str, port: int, command: str) -> str:
    from paramiko import SSHConfig

    conf = SSHConfig.from_text(f"Host {host}\n    Port {port}\n    ProxyCommand {command}\n")
    return str(conf.lookup(host)["proxycommand"])


class _Proxy:
    """A ProxyCommand on one end of a socketpair; paramiko gets the other end."""

    def __init__(self, command: str) -> None:
        import socket
        import subprocess

        parent, child = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                shlex.split(command),
                stdin=child.fileno(),
                stdout=child.fileno(),
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent

    def close(self) -> None:
        import subprocess

        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def fabric_connector(
    *,
    ssh_config: str | None = None,
    user: str | None = None,
    key_filename: str | None = None,
    connect_timeout: float = 10.0,
    host_timeout: float = 600.0,
) -> Connector:
    def connect(host: str) -> Remote:
        return FabricRemote(
            host,
            ssh_config=ssh_config,
            user=user,
            key_filename=key_filename,
            connect_timeout=connect_timeout,
            deadline=time.monotonic() + host_timeout,
        )

    return connect


HostFn = Callable[[Remote, HostResult], None]


def _run_one(host: str, connect: Connector, fn: HostFn) -> HostResult:
    res = HostResult(host)
    t0 = time.monotonic()
    remote: Remote | None = None
    try:
        remote = connect(host)
        fn(remote, res)
    except Unreachable as e:
        res.unreachable = str(e) or "unreachable"
    except HostTimeout as e:
        res.add("timeout", FAILED, str(e))
    except RemoteCommandError as e:
        res.add("command", FAILED, str(e))
    except Exception as e:  # one host's bug must not take the other hosts' results down
        res.add("error", FAILED, f"{type(e).__name__}: {e}")
    finally:
        if remote is not None:
            remote.close()
        res.seconds = time.monotonic() - t0
    return res


def run_hosts(
    hosts: Iterable[str],
    connect: Connector,
    fn: HostFn,
    *,
    forks: int = 5,
    host_timeout: float = 600.0,
) -> list[HostResult]:
    """Run ``fn`` on every host (bounded pool); one result per host, in input order."""
    hosts = list(hosts)
    results: dict[str, HostResult] = {}
    pool = cf.ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts) or 1)))
    futures = {pool.submit(_run_one, h, connect, fn): h for h in hosts}
    # the Remote enforces the deadline on every command; this wait is the safety net for a
    # worker stuck outside a command (e.g. a hung SFTP transfer)
    done, pending = cf.wait(futures, timeout=host_timeout * max(1, -(-len(hosts) // forks)) + 30)
    for fut in done:
        results[futures[fut]] = fut.result()
    for fut in pending:
        h = futures[fut]
        r = HostResult(h)
        r.add("timeout", FAILED, f"no result within {host_timeout:.0f}s")
        results[h] = r
    pool.shutdown(wait=not pending, cancel_futures=True)
    return [results[h] for h in hosts]


def expand_limit(hosts: list[str], limit: str | None) -> list[str]:
    """``--limit a,b`` or ``--limit @retry-file``: the hosts to run on, in ``hosts`` order
    (hosts named only in the limit are added at the end)."""
    if not limit:
        return hosts
    if limit.startswith("@"):
        from playbooks.recap import read_retry_file

        wanted = read_retry_file(Path(limit[1:]))
    else:
        wanted = [h for h in limit.split(",") if h]
    return [h for h in hosts if h in wanted] + [h for h in wanted if h not in hosts]

"""Processes the lab starts: identity by (PID, start time), liveness, launching, reaping.

A PID alone is not an identity: PIDs are reused. Every PID the lab records is
stored with its start time (field 22 of ``/proc/PID/stat``), and the lab only
ever signals a PID whose start time still matches.

Liveness reads the state field of ``/proc/PID/stat``: on this kind of machine
the host's PID 1 reaps adopted orphans only every ~2 s, so a dead daemon stays
a zombie for a while and ``kill -0`` would still call it alive.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Proc", "children", "launch", "stat"]


def stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of PID, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def children(pid: int) -> list[int]:
    """Direct children of PID (any thread), from /proc/PID/task/*/children."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class Proc:
    """A process the lab started: PID plus start time."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        st = stat(pid)
        return None if st is None else cls(pid, st[2])

    def running(self) -> bool:
        """True while the process exists, is this same process and is not a zombie."""
        st = stat(self.pid)
        return st is not None and st[2] == self.start and st[0] not in ("Z", "X", "x")

    def exists(self) -> bool:
        """True while the PID is this process, zombies included."""
        st = stat(self.pid)
        return st is not None and st[2] == self.start

    def signal(self, sig: int = signal.SIGKILL) -> bool:
        """Send SIG if this is still our process; False if it is gone."""
        if not self.running():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def reap(self) -> None:
        """waitpid() it if it is our child (no zombie left behind by this process)."""
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def wait_gone(self, timeout: float) -> bool:
        """Wait until the process is no longer running; True if it went away in time."""
        deadline = time.monotonic() + timeout
        while True:
            self.reap()
            if not self.running():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def to_json(self) -> list[int]:
        return [self.pid, self.start]

    @classmethod
    def from_json(cls, v: Sequence[int]) -> Proc:
        return cls(int(v[0]), int(v[1]))


def launch(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: str,
    pass_fd: int | None = None,
) -> Proc:
    """Start ARGV detached (own session, stdin /dev/null, output appended to LOG).

    posix_spawn rather than subprocess.Popen: the lab outlives the Popen objects
    of a short-lived CLI run, and a Popen that is garbage-collected while its
    child runs warns. PASS_FD, if given, becomes fd 3 of the child.
    """
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    if pass_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, pass_fd, 3))
    pid = os.posix_spawnp(argv[0], list(argv), dict(env), file_actions=actions, setsid=True)
    st = stat(pid)
    return Proc(pid, st[2] if st else 0)

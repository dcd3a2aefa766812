#!/usr/bin/env python3
"""dtake-supervisor: a small service supervisor for hosts where systemd is not PID 1
(lab nodes in namespaces, containers). Installed by dtsetup; standard library only.

It gives the service what the systemd unit gives it: a pidfile (the supervisor's pid, as
systemd's main pid), ``Type=notify`` readiness (a NOTIFY_SOCKET; ``start`` returns once the
service sent READY=1), restart on failure with a capped backoff, SIGTERM forwarded on stop.

    dtake-supervisor start  --pidfile P [--log L] [--notify] -- CMD ARGS...
    dtake-supervisor stop   --pidfile P
    dtake-supervisor status --pidfile P      (exit 0 running, 3 not running: LSB)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RUNNING, NOT_RUNNING = 0, 3


def read_pid(pidfile: Path) -> int | None:
    """The supervisor's pid if the pidfile names a live supervisor of this pidfile."""
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(pidfile).encode() in cmdline else None


def _ready_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.name + ".ready")


def _notify_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.name + ".notify")


def supervise(pidfile: Path, log: Path | None, notify: bool, cmd: list[str]) -> int:
    stop = False
    restart = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    def on_hup(signum: int, frame: object) -> None:
        nonlocal restart
        restart = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    pidfile.write_text(f"{os.getpid()}\n")
    sock: socket.socket | None = None
    env = dict(os.environ)
    if notify:
        path = _notify_path(pidfile)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        env["NOTIFY_SOCKET"] = str(path)
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    backoff = 1.0
    try:
        while not stop:
            started = time.monotonic()
            child = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
            if not notify:
                _ready_path(pidfile).write_text(f"{child.pid}\n")
            while child.poll() is None and not stop and not restart:
                readable = select.select([sock] if sock else [], [], [], 0.2)[0]
                if sock is not None and readable:
                    message = sock.recv(4096).decode(errors="replace")
                    if "READY=1" in message.split("\n"):
                        _ready_path(pidfile).write_text(f"{child.pid}\n")
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            with contextlib.suppress(FileNotFoundError):
                _ready_path(pidfile).unlink()
            if stop:
                break
            if restart:
                restart, backoff = False, 1.0
                continue
            # Restart=on-failure with a capped backoff; a clean exit ends supervision.
            if child.returncode == 0:
                break
            if time.monotonic() - started > 60:
                backoff = 1.0
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
    finally:
        for path in (pidfile, _notify_path(pidfile), _ready_path(pidfile)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return 0


def start(pidfile: Path, log: Path | None, notify: bool, cmd: list[str], timeout: float) -> int:
    if read_pid(pidfile) is not None:
        return 0
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        _ready_path(pidfile).unlink()
    first = os.fork()
    if first == 0:  # daemonize: new session, second fork, no controlling terminal
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        code = 1
        try:
            code = supervise(pidfile, log, notify, cmd)
        finally:
            os._exit(code)
    os.waitpid(first, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready_path(pidfile).exists() and read_pid(pidfile) is not None:
            return 0
        time.sleep(0.05)
    print(f"dtake-supervisor: service not ready after {timeout:g}s", file=sys.stderr)
    stop(pidfile, timeout=timeout)
    return 1


def stop(pidfile: Path, timeout: float = 60.0) -> int:
    pid = read_pid(pidfile)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtake-supervisor")
    parser.add_argument("action", choices=["start", "stop", "status", "restart"])
    parser.add_argument("--pidfile", type=Path, required=True)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--notify", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    words = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in words:  # everything after -- is the service's command line
        cut = words.index("--")
        words, cmd = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if args.action == "status":
        return RUNNING if read_pid(args.pidfile) is not None else NOT_RUNNING
    if args.action == "stop":
        return stop(args.pidfile, args.timeout)
    if not cmd:
        parser.error("start needs the service command after --")
    if args.action == "restart":
        stop(args.pidfile, args.timeout)
    return start(args.pidfile, args.log, args.notify, cmd, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

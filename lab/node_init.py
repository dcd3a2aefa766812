"""PID 1 of a lab node: build the node's private filesystem view, then reap.

Run as a plain script (no package imports, so it starts in ~20 ms), by
``ip netns exec NS unshare --mount --uts --ipc --pid --fork --kill-child
--mount-proc --propagation private -- PYTHON node_init.py SPEC.json``. It is
therefore already inside the node's network, mount, uts, ipc and pid
namespaces. It:

1. opens every bind source as an ``O_PATH`` fd *before* mounting anything, so
   a source under a path that is covered later (the state dir under /run or
   /var) still refers to the host's directory, never to the overlay;
2. mounts, in order: overlays (/etc, /var, ...), binds (through
   ``/proc/self/fd/N``), tmpfs (/dev/shm, /run last);
3. sets the hostname, creates the /run skeleton, reports "ok" (or the error)
   on fd 3 and closes it;
4. reaps every child (orphans are re-parented to it) until it is killed.

The mount(2) syscall is called directly, never mount(8): libmount would
create ``/run/mount/utab`` on the host's /run before our tmpfs covers it.
SIGKILL (from the host) or SIGTERM of this process powers the node off: the
kernel kills every process of the pid namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(err)}")


def _setup(spec: dict[str, object]) -> None:
    os.chdir("/")
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    mounts = spec["mounts"]
    assert isinstance(mounts, list)
    # 1. resolve every bind source now, before anything covers it
    fds: dict[int, int] = {}
    for i, m in enumerate(mounts):
        if m["kind"] == "bind":
            fds[i] = os.open(m["source"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    # 2. mount in the given order (overlays, binds, tmpfs)
    for i, m in enumerate(mounts):
        kind, target = m["kind"], m["target"]
        if m.get("mkdir"):
            os.makedirs(target, exist_ok=True)
        if kind == "overlay":
            _mount("dtake-lab", target, "overlay", 0, m["options"])
        elif kind == "bind":
            _mount(f"/proc/self/fd/{fds[i]}", target, None, MS_BIND | MS_REC, None)
            os.close(fds[i])
        elif kind == "tmpfs":
            _mount(m.get("source", "tmpfs"), target, "tmpfs", MS_NOSUID | MS_NODEV, m["options"])
        else:
            raise ValueError(f"unknown mount kind {kind!r}")
    # 3. the /run skeleton that daemons expect (Debian's tmpfiles.d, by hand)
    for path, mode in spec.get("run_dirs", []):  # type: ignore[attr-defined]
        os.makedirs(path, exist_ok=True)
        os.chmod(path, int(mode, 8))
    if not os.path.exists("/run/shm"):
        os.symlink("/dev/shm", "/run/shm")
    hostname = spec["hostname"]
    assert isinstance(hostname, str)
    socket.sethostname(hostname)


def _reap_forever() -> None:
    # SIGCHLD blocked and waited for: every orphan is reaped as soon as it exits,
    # also when the init had no child a moment before.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        signal.sigtimedwait({signal.SIGCHLD}, 5.0)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    # PID 1 gets only the signals it handles: make TERM/INT a power-off.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    try:
        _setup(spec)
    except BaseException as e:  # report anything to the launcher, then die
        try:
            os.write(3, f"error: {e}\n".encode())
        finally:
            os._exit(1)
    os.write(3, b"ok\n")
    os.close(3)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    _reap_forever()


if __name__ == "__main__":
    main()

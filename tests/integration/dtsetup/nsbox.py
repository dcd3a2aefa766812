"""A throwaway host inside this one: new mount, network, PID and UTS namespaces, with every
place ``dtsetup apply`` writes to covered by an overlay whose upper layer lives on a tmpfs
(or, for /run, a fresh tmpfs). Commands run inside through ``nsenter``, and a testinfra
backend does the same, so testinfra's modules (file, group, process, socket) look at the
box, not at this machine.

Nothing written inside reaches this machine: the overlays' upper layers hold every change
(they are also the exact list of what was written, used to prove that uninstall leaves
nothing behind), the nftables ruleset is the new network namespace's own, and killing the
box's init (PID 1 of its PID namespace) ends every process started inside and frees the
namespaces, the mounts and the tmpfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testinfra.backend import base
from testinfra.host import Host

# Where dtsetup writes on a live host (docs/dtsetup.md), overlaid; /run gets its own tmpfs
# (no /run/systemd/system inside, so dtsetup picks its supervisor, as on lab nodes).
OVERLAID = ("/etc", "/opt", "/var", "/usr/lib/ocf", "/root")

# The box's PID 1: mounts, hostname, loopback up, "ready", then reap orphans as an init
# does (the daemonized supervisor is reparented to it; an unreaped zombie would still
# look alive in /proc to ``dtake-supervisor stop``).
INIT = r"""
import json, os, socket, subprocess, sys, time
stage, ready, hostname, overlaid = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
def sh(*argv):
    subprocess.run(argv, check=True)
sh("mount", "-t", "tmpfs", "-o", "mode=0700", "dtsetup-box", stage)
for d in overlaid:
    name = d.strip("/").replace("/", "_")
    up, work = f"{stage}/upper/{name}", f"{stage}/work/{name}"
    os.makedirs(up)
    os.makedirs(work)
    sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={d},upperdir={up},workdir={work}", d)
sh("mount", "-t", "tmpfs", "-o", "mode=0755", "dtsetup-run", "/run")
socket.sethostname(hostname)
sh("ip", "link", "set", "lo", "up")
with open(ready + ".tmp", "w") as fh:
    fh.write("ready\n")
os.rename(ready + ".tmp", ready)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.05)
"""

# Run inside the box: every entry of the overlays' upper layers and of /run.
UPPER_LISTING = r"""
import hashlib, json, os, stat, sys
stage, overlaid = sys.argv[1], json.loads(sys.argv[2])
out = {}
def walk(top, label):
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = label + "/" + os.path.relpath(p, top)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    kind = hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat.S_ISCHR(st.st_mode):
                kind = "whiteout"
            elif stat.S_ISLNK(st.st_mode):
                kind = "->" + os.readlink(p)
            else:
                kind = "other"
            out[rel] = [stat.S_IMODE(st.st_mode), kind]
for d in overlaid:
    walk(f"{stage}/upper/{d.strip('/').replace('/', '_')}", d.rstrip("/"))
walk("/run", "/run")
print(json.dumps(out, sort_keys=True))
"""


class NsenterBackend(base.BaseBackend):
    """testinfra backend: every command runs in the box's namespaces through nsenter
    (as testinfra's own chroot backend runs them through chroot)."""

    NAME = "nsenter"

    def __init__(self, pid: int, *args: Any, **kwargs: Any) -> None:
        self.pid = pid
        super().__init__(f"box{pid}", *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.get_command(command, *args)
        out = self.run_local(
            "nsenter --target %s --mount --net --pid --uts -- /bin/sh -c %s", str(self.pid), cmd
        )
        out.command = self.encode(cmd)
        return out


class NsBox:
    def __init__(self, workdir: Path, hostname: str) -> None:
        self.workdir = workdir
        self.stage = workdir / "stage"
        self.stage.mkdir(parents=True)
        self.ready = workdir / "ready"
        self.hostname = hostname
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # the box's init, as seen from this machine

    def start(self, timeout: float = 30.0) -> None:
        argv = ["unshare", "--mount", "--net", "--uts", "--pid", "--fork", "--mount-proc"]
        argv += ["--propagation", "private", "--", sys.executable, "-c", INIT]
        argv += [str(self.stage), str(self.ready), self.hostname, json.dumps(OVERLAID)]
        with (self.workdir / "box.log").open("wb") as log:  # unshare's own messages
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"namespace box exited {self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("namespace box not ready")
            time.sleep(0.05)
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        self.pid = int(children.split()[0])

    def stop(self) -> None:
        """SIGKILL the box's init: the kernel then kills everything in its PID namespace."""
        if self.proc is None:
            return
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def host(self) -> Host:
        backend = NsenterBackend(self.pid)
        host = Host(backend)
        backend.set_host(host)
        return host

    def run(
        self, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """argv inside the box (no shell), from a clean environment plus ``env``."""
        full = ["nsenter", "--target", str(self.pid), "--mount", "--net", "--pid", "--uts"]
        base_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        return subprocess.run(
            [*full, "--", *argv],
            capture_output=True,
            text=True,
            check=False,
            env=base_env | {"HOME": "/root", "LC_ALL": "C"} | (env or {}),
        )

    def upper_listing(self) -> dict[str, tuple[int, str]]:
        """Everything written inside: the overlays' upper entries and /run's content."""
        done = self.run(sys.executable, "-c", UPPER_LISTING, str(self.stage), json.dumps(OVERLAID))
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        return {k: (v[0], v[1]) for k, v in json.loads(done.stdout).items()}


def real_entry(path: str) -> tuple[int, str] | None:
    """(mode, sha256 | "dir" | "->target") of a path on this machine, None if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return stat.S_IMODE(st.st_mode), "->" + os.readlink(path)
    if stat.S_ISDIR(st.st_mode):
        return stat.S_IMODE(st.st_mode), "dir"
    with open(path, "rb") as fh:
        return stat.S_IMODE(st.st_mode), hashlib.sha256(fh.read()).hexdigest()


def leftovers(listing: dict[str, tuple[int, str]], ignored: set[str]) -> dict[str, Any]:
    """Upper-layer entries that differ from this machine's own: what the box still has
    that the real host does not. A directory or file copied up unchanged (same mode and
    content: the overlay copies a file up when it is merely opened for writing, as
    shadow-utils does with /etc/group) is not a leftover; /run started empty."""
    found: dict[str, Any] = {}
    for path, entry in listing.items():
        if path in ignored:
            continue
        if path.startswith("/run/") or entry[1] == "whiteout" or real_entry(path) != entry:
            found[path] = {"box": entry, "host": real_entry(path)}
    return found

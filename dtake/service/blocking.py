"""Block target paths [L5001-5011]: other programs see a target path read-only.

Linux has no per-process filter like the seed's driver, so (DESIGN §2) a blocked path
gets a read-only bind mount over itself. The service opened a directory fd on the path
*before* the mount; the fd keeps pointing at the writable mount underneath, and the
service writes through it (``/proc/self/fd/N`` for code that wants a path). Everybody
else resolves the path to the read-only mount and gets EROFS.

Mount namespace caveat: the bind mount lives in the service's mount namespace and
propagates like any other mount there. Processes in another mount namespace (a
container, a systemd unit with PrivateMounts=/ProtectSystem=, ``unshare -m``) that
already had the filesystem mounted are NOT blocked, and a service started in a private
namespace blocks nobody outside it. Run the service in the host namespace.

Blocked paths persist in ``<state_dir>/blocked.json`` (seed: they survive a target
restart). At start, a read-only bind mount left over a recorded path by a crashed
service is removed first, so the new fd is taken on the writable mount again.
Events: 4302/4304 blocked/unblocked, 4303/4305 failed, 4306/4307 already (un)blocked,
4308 persisted state corrupt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from dtake.errors import DtakeError, E
from dtake.service.snapshot import Runner, SubprocessRunner, _unescape

if TYPE_CHECKING:
    from dtake.service.daemon import Service

__all__ = ["Blocker", "top_mount"]

log = logging.getLogger("dtake.blocking")


def top_mount(path: str, mountinfo: str = "/proc/self/mountinfo") -> dict[str, Any] | None:
    """The last (top-most) mount whose mount point is exactly ``path``."""
    found: dict[str, Any] | None = None
    with open(mountinfo, encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            f = left.split()
            if _unescape(f[4]) == path:
                found = {
                    "mount_id": int(f[0]),
                    "root": _unescape(f[3]),
                    "options": f[5].split(","),
                    "fstype": right.split()[0],
                }
    return found


class Blocker:
    def __init__(self, svc: Service, runner: Runner | None = None) -> None:
        self.svc = svc
        self.runner: Runner = runner or SubprocessRunner()
        self._fds: dict[str, int] = {}
        self._mounts: dict[str, int] = {}  # path -> mount id of our bind mount
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ persistence
    def _save(self) -> None:
        self.svc.store.save("blocked.json", sorted(self._fds))

    def restore(self) -> None:
        """Re-block the persisted paths (at service start)."""
        try:
            paths = self.svc.store.load("blocked.json", [])
            if not isinstance(paths, list):
                raise ValueError("not a list")
        except (DtakeError, ValueError) as exc:
            self.svc.events.emit(4308, key="blocked.json")
            log.error("blocked paths not restored: %s", exc)
            return
        for p in paths:
            p = os.path.normpath(str(p))
            top = top_mount(p)
            if top is not None and "ro" in top["options"]:
                # A crashed service's bind mount: remove it to reach the writable one.
                self.runner(["umount", p])
            try:
                self.block(p)
            except DtakeError as exc:
                log.error("%s", exc)

    # ------------------------------------------------------------------ API
    def is_blocked(self, path: str) -> bool:
        return os.path.normpath(path) in self._fds

    def blocked(self) -> list[str]:
        with self._lock:
            return sorted(self._fds)

    def writable_path(self, path: str, *, for_child: bool = False) -> str:
        """A path through which the service can write ``path`` even while blocked."""
        p = os.path.normpath(path)
        with self._lock:
            fd = self._fds.get(p)
        if fd is None:
            return p
        return f"/proc/{os.getpid() if for_child else 'self'}/fd/{fd}"

    def block(self, path: str) -> dict[str, Any]:
        p = os.path.normpath(path)
        if not p.startswith("/") or p == "/":
            raise DtakeError(E.INVALID_PARAMETER, f"cannot block {path!r}")
        with self._lock:
            if p in self._fds:
                self.svc.events.emit(4306, source=p, source_ip="", con_id="")
                return {"path": p, "blocked": True, "changed": False}
            for other in self._fds:
                if p.startswith(other + "/"):
                    raise DtakeError(-181, f"Parent path is blocked: {other}")
                if other.startswith(p + "/"):
                    raise DtakeError(-180, f"Child path is blocked: {other}")
            os.makedirs(p, exist_ok=True)
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            r = self.runner(["mount", "--bind", p, p])
            if r.returncode == 0:
                r = self.runner(["mount", "-o", "remount,bind,ro", p, p])
                if r.returncode != 0:
                    self.runner(["umount", p])
            if r.returncode != 0:
                os.close(fd)
                self.svc.events.emit(4303, path=p, code=r.returncode)
                raise DtakeError(
                    E.UNKNOWN, f"Blocking of target path: {p} failed: {r.stderr.strip()}"
                )
            top = top_mount(p)
            self._fds[p] = fd
            self._mounts[p] = int(top["mount_id"]) if top else -1
            self._save()
        self.svc.events.emit(4302, path=p)
        return {"path": p, "blocked": True, "changed": True}

    def unblock(self, path: str) -> dict[str, Any]:
        p = os.path.normpath(path)
        with self._lock:
            fd = self._fds.get(p)
            if fd is None:
                self.svc.events.emit(4307, source=p, source_ip="", con_id="")
                return {"path": p, "blocked": False, "changed": False}
            top = top_mount(p)
            if top is not None and top["mount_id"] == self._mounts.get(p):
                r = self.runner(["umount", p])
                if r.returncode != 0:
                    self.svc.events.emit(4305, path=p, code=r.returncode)
                    raise DtakeError(
                        E.UNKNOWN, f"Unblocking of target path: {p} failed: {r.stderr.strip()}"
                    )
            else:
                # Someone mounted over ours (or removed it): never unmount theirs.
                log.warning("%s: our read-only bind mount is not on top; left alone", p)
            del self._fds[p]
            self._mounts.pop(p, None)
            with contextlib.suppress(OSError):
                os.close(fd)
            self._save()
        self.svc.events.emit(4304, path=p)
        return {"path": p, "blocked": False, "changed": True}

    def close(self) -> None:
        """Service stop: keep the mounts (blocked paths persist) but drop our fds."""
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()

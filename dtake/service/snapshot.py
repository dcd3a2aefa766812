"""Snapshots of target data through providers [L5586-5666], taken on the TARGET node.

Providers (DESIGN, seed-engine.md §13.2): a btrfs subvolume snapshot, an LVM thin
snapshot of the volume that holds the target path, and a copy fallback that works on any
filesystem (``cp --reflink=auto -a``: instant on btrfs/XFS, a real copy elsewhere). A
snapshot is created in a temporary name and renamed into place, so a crash never leaves a
half snapshot that looks whole.

Policy [L5627-5652]:
* automatic: before every good -> bad transition; only one per connection (a new one
  replaces the old);
* scheduled: every ``interval`` (>= 15 minutes) from a start time; in a bad state the
  snapshot is delayed (event 4403) and several delayed ones coalesce into one, taken when
  the data is good again;
* manual: in any state;
* at most ``max_keep`` (64) per target; the oldest is pruned;
* a revert replaces the target's content with the snapshot's and sets Snapshot Reverted.

Revert works the same for every provider, through the directory fd the service opened
before any read-only bind mount (:mod:`dtake.service.blocking`): the snapshot is copied
into a hidden staging directory inside the target root (same filesystem, reflinks when
possible), the current entries are renamed into a hidden trash directory, the staged ones
are renamed into place, and both hidden directories are removed. Their names match the
apply module's temp pattern, so scans skip them and a crash leaves nothing a scan or
mirror would see (``TargetTree.cleanup_temp`` removes them).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dtake.errors import DtakeError, E

if TYPE_CHECKING:
    from dtake.service.daemon import Service
    from dtake.service.target import TargetState

__all__ = [
    "MAX_SNAPSHOTS",
    "MIN_INTERVAL_S",
    "BtrfsProvider",
    "CopyProvider",
    "LvmThinProvider",
    "Provider",
    "Runner",
    "Schedule",
    "SnapshotManager",
    "SnapshotRecord",
    "SubprocessRunner",
    "copy_into",
    "prune",
    "revert_into",
    "select_provider",
]

log = logging.getLogger("dtake.snapshot")

MAX_SNAPSHOTS = 64  # VSS limit kept as the default [L5592]
MIN_INTERVAL_S = 15 * 60  # scheduled snapshots at least 15 minutes apart [L5640]
CREATE_TIMEOUT_S = 60.0  # creation must finish in 1 minute [L5592]
KINDS = ("manual", "auto", "scheduled")


# ---------------------------------------------------------------------------- seams
@dataclass
class RunResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, timeout: float = CREATE_TIMEOUT_S) -> RunResult: ...


class SubprocessRunner:
    """The real runner; tests substitute a scripted one."""

    def __call__(self, argv: Sequence[str], *, timeout: float = CREATE_TIMEOUT_S) -> RunResult:
        try:
            p = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            return RunResult(127, "", str(exc))
        except subprocess.TimeoutExpired:
            return RunResult(124, "", f"{argv[0]} timed out after {timeout:g}s")
        return RunResult(p.returncode, p.stdout, p.stderr)


def _check(r: RunResult, what: str) -> RunResult:
    if r.returncode != 0:
        raise DtakeError(E.UNKNOWN, f"{what} failed ({r.returncode}): {r.stderr.strip()}")
    return r


# ---------------------------------------------------------------------------- records
@dataclass
class SnapshotRecord:
    id: str
    target_path: str
    kind: str  # manual | auto | scheduled
    provider: str
    location: str  # provider-specific: a directory, a subvolume, "vg/lv"
    created: float
    uuid: str = ""
    conn_id: int = 0
    data_state: str = ""  # the data state when it was taken (good snapshots are "OK")
    reason: str = ""
    subpath: str = ""  # LVM: the target path relative to the volume's mount point

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune(records: Sequence[SnapshotRecord], *, max_keep: int) -> list[SnapshotRecord]:
    """Which snapshots of ONE target to delete: older automatic ones (only one automatic
    snapshot per connection [L5631]), then the oldest beyond ``max_keep`` [L5592]."""
    ordered = sorted(records, key=lambda r: (r.created, r.id))
    doomed: list[SnapshotRecord] = []
    autos = [r for r in ordered if r.kind == "auto"]
    doomed.extend(autos[:-1])
    rest = [r for r in ordered if r not in doomed]
    excess = len(rest) - max(1, max_keep)
    if excess > 0:
        doomed.extend(rest[:excess])
    return doomed


# ---------------------------------------------------------------------------- schedule
@dataclass
class Schedule:
    """Scheduled snapshots of one target [L5636-5652]; pure logic, the clock is passed in.

    ``tick(now, good)`` returns "take" when a snapshot is due and the data is good,
    "delay" the first time one falls due in a bad state (event 4403), else None. Due times
    missed while bad (or while the service was down) coalesce into one snapshot.
    """

    interval_s: float = 3600.0  # default every hour [L5640]
    next_due: float = 0.0
    enabled: bool = True
    delayed: bool = False

    def __post_init__(self) -> None:
        if self.interval_s < MIN_INTERVAL_S:
            raise DtakeError(
                E.INVALID_PARAMETER,
                f"snapshot interval must be at least {MIN_INTERVAL_S // 60} minutes",
            )

    def tick(self, now: float, good: bool) -> str | None:
        if not self.enabled:
            return None
        if self.delayed:
            if not good:
                return None
            self.delayed = False
            self._advance(now)
            return "take"
        if now < self.next_due:
            return None
        if not good:
            self.delayed = True
            self._advance(now)
            return "delay"
        self._advance(now)
        return "take"

    def _advance(self, now: float) -> None:
        # Skip every due time already passed: missed ones are not taken one by one.
        if self.next_due <= now:
            steps = int((now - self.next_due) // self.interval_s) + 1
            self.next_due += steps * self.interval_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- copying
def _is_ours(name: str) -> bool:
    from dtake.service.apply import is_temp_name

    return is_temp_name(name)


def copy_into(runner: Runner, src_dir: str, dst_dir: str, *, timeout: float) -> None:
    """Copy the content of ``src_dir`` into the existing ``dst_dir`` (reflinks if possible).

    ``src_dir`` may be a ``/proc/PID/fd/N`` directory link: ``src/.`` walks through it.
    """
    _check(
        runner(
            ["cp", "-a", "--reflink=auto", "--no-preserve=links", f"{src_dir}/.", dst_dir],
            timeout=timeout,
        ),
        f"copy of {src_dir}",
    )
    # Our own in-flight temp files are not part of the data.
    with os.scandir(dst_dir) as it:
        for e in it:
            if _is_ours(e.name):
                _rmtree(e.path)


def _rmtree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def revert_into(runner: Runner, snap_dir: str, root: str, *, timeout: float) -> int:
    """Make directory ``root`` hold exactly the content of ``snap_dir``; returns entries."""
    token = secrets.token_hex(8)
    staging = os.path.join(root, f".revert.dtake-{token}")
    trash = os.path.join(root, f".trash.dtake-{token}")
    os.mkdir(staging, 0o700)
    try:
        copy_into(runner, snap_dir, staging, timeout=timeout)
        os.mkdir(trash, 0o700)
        for name in os.listdir(root):
            if name in (os.path.basename(staging), os.path.basename(trash)):
                continue
            os.rename(os.path.join(root, name), os.path.join(trash, name))
        moved = 0
        for name in os.listdir(staging):
            os.rename(os.path.join(staging, name), os.path.join(root, name))
            moved += 1
        st = os.stat(snap_dir)
        os.chmod(root, st.st_mode & 0o7777)
        with contextlib.suppress(PermissionError):
            os.chown(root, st.st_uid, st.st_gid)
        os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))
        return moved
    finally:
        _rmtree(staging)
        _rmtree(trash)


# ---------------------------------------------------------------------------- providers
class Provider(Protocol):
    name: str

    def supports(self, path: str) -> bool: ...

    def create(self, src: str, rec: SnapshotRecord, *, timeout: float) -> None:
        """Create ``rec`` of directory ``src`` (readable path); sets rec.location."""

    def delete(self, rec: SnapshotRecord) -> None: ...

    def view(self, rec: SnapshotRecord) -> contextlib.AbstractContextManager[str]:
        """A readable directory with the snapshot's content of the target path."""


class CopyProvider:
    """Works anywhere: ``cp --reflink=auto -a`` into ``<dir>/<key>/<id>`` (temp + rename)."""

    name = "copy"

    def __init__(self, runner: Runner, snap_dir: str) -> None:
        self.runner = runner
        self.snap_dir = snap_dir

    def supports(self, path: str) -> bool:
        return True

    def create(self, src: str, rec: SnapshotRecord, *, timeout: float) -> None:
        parent = os.path.join(self.snap_dir, _key(rec))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        final = os.path.join(parent, rec.id)
        tmp = tempfile.mkdtemp(prefix=f".{rec.id}.", dir=parent)
        try:
            copy_into(self.runner, src, tmp, timeout=timeout)
            os.rename(tmp, final)
        except BaseException:
            _rmtree(tmp)
            raise
        rec.location = final

    def delete(self, rec: SnapshotRecord) -> None:
        if rec.location and os.path.lexists(rec.location):
            shutil.rmtree(rec.location)
        parent = os.path.dirname(rec.location)
        with contextlib.suppress(OSError):
            os.rmdir(parent)

    @contextlib.contextmanager
    def view(self, rec: SnapshotRecord) -> Iterator[str]:
        if not os.path.isdir(rec.location):
            raise DtakeError(E.UNKNOWN, f"snapshot {rec.id} is missing: {rec.location}")
        yield rec.location


def _fs_type(path: str) -> str:
    """Filesystem type of the mount that holds ``path`` (longest mount-point prefix)."""
    best, kind = "", ""
    p = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                mp = _unescape(left.split()[4])
                if (p == mp or p.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                    best, kind = mp, right.split()[0]
    except OSError:
        return ""
    return kind


def _mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, device, fs type) of the mount holding ``path``."""
    best: tuple[str, str, str] = ("", "", "")
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            mp = _unescape(left.split()[4])
            if (p == mp or p.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
                r = right.split()
                best = (mp, r[1], r[0])
    return best


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


class BtrfsProvider:
    """Read-only btrfs snapshot of the target path (which must be a subvolume) into
    ``<parent>/.dtake-snapshots/<name>/<id>`` on the same filesystem."""

    name = "btrfs"

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def supports(self, path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        # Subvolume roots have inode 256 on btrfs.
        return st.st_ino == 256 and _fs_type(path) == "btrfs"

    def create(self, src: str, rec: SnapshotRecord, *, timeout: float) -> None:
        tp = rec.target_path.rstrip("/")
        parent = os.path.join(os.path.dirname(tp), ".dtake-snapshots", os.path.basename(tp))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        tmp = os.path.join(parent, f".{rec.id}.tmp")
        final = os.path.join(parent, rec.id)
        # `src` may be a /proc/PID/fd/N link (path blocked); btrfs needs the subvolume
        # itself, which the link resolves to.
        _check(
            self.runner(
                ["btrfs", "subvolume", "snapshot", "-r", src.rstrip("/"), tmp], timeout=timeout
            ),
            "btrfs subvolume snapshot",
        )
        os.rename(tmp, final)
        rec.location = final

    def delete(self, rec: SnapshotRecord) -> None:
        if rec.location and os.path.lexists(rec.location):
            _check(
                self.runner(["btrfs", "subvolume", "delete", rec.location]),
                "btrfs subvolume delete",
            )

    @contextlib.contextmanager
    def view(self, rec: SnapshotRecord) -> Iterator[str]:
        if not os.path.isdir(rec.location):
            raise DtakeError(E.UNKNOWN, f"snapshot {rec.id} is missing: {rec.location}")
        yield rec.location


class LvmThinProvider:
    """Thin snapshot (``lvcreate -s``) of the thin LV holding the target path: the whole
    volume, as the seed snapshots whole volumes [L5588]. Reading it means activating it
    (``-K``: thin snapshots skip activation by default) and mounting it read-only."""

    name = "lvm"

    def __init__(self, runner: Runner, mount_dir: str) -> None:
        self.runner = runner
        self.mount_dir = mount_dir

    def _lv_of(self, path: str) -> tuple[str, str, str, str]:
        """(vg, lv, mount point, fs type) or raises."""
        mp, dev, fstype = _mount_of(path)
        r = _check(
            self.runner(
                [
                    "lvs",
                    "--noheadings",
                    "--separator",
                    "|",
                    "-o",
                    "vg_name,lv_name,pool_lv",
                    dev,
                ]
            ),
            "lvs",
        )
        fields = [f.strip() for f in r.stdout.strip().split("|")]
        if len(fields) < 3 or not fields[2]:
            raise DtakeError(E.NOT_SUPPORTED, f"{dev} is not an LVM thin volume")
        return fields[0], fields[1], mp, fstype

    def supports(self, path: str) -> bool:
        try:
            self._lv_of(path)
        except (DtakeError, OSError):
            return False
        return True

    def create(self, src: str, rec: SnapshotRecord, *, timeout: float) -> None:
        vg, lv, mp, fstype = self._lv_of(rec.target_path)
        name = f"dtake_{rec.id}"
        # Flush what we wrote through the fd so the block-level snapshot holds it.
        _check(self.runner(["sync", "-f", src.rstrip("/") + "/."]), "sync")
        _check(
            self.runner(
                ["lvcreate", "-s", "-n", name, "--addtag", "dtake", f"{vg}/{lv}"], timeout=timeout
            ),
            "lvcreate",
        )
        rec.location = f"{vg}/{name}"
        rec.subpath = os.path.relpath(os.path.realpath(rec.target_path), mp)
        rec.reason = rec.reason or fstype

    def delete(self, rec: SnapshotRecord) -> None:
        _check(self.runner(["lvremove", "-f", rec.location]), "lvremove")

    @contextlib.contextmanager
    def view(self, rec: SnapshotRecord) -> Iterator[str]:
        os.makedirs(self.mount_dir, mode=0o700, exist_ok=True)
        mnt = tempfile.mkdtemp(prefix="lv-", dir=self.mount_dir)
        _check(self.runner(["lvchange", "-ay", "-K", rec.location]), "lvchange -ay")
        opts = "ro,nouuid" if rec.reason == "xfs" else "ro"
        try:
            _check(self.runner(["mount", "-o", opts, f"/dev/{rec.location}", mnt]), "mount")
            try:
                yield os.path.normpath(os.path.join(mnt, rec.subpath))
            finally:
                self.runner(["umount", mnt])
        finally:
            self.runner(["lvchange", "-an", rec.location])
            with contextlib.suppress(OSError):
                os.rmdir(mnt)


def _key(rec: SnapshotRecord) -> str:
    if rec.uuid:
        return rec.uuid
    return re.sub(r"[^A-Za-z0-9._-]", "_", rec.target_path.strip("/")) or "root"


def select_provider(path: str, preferred: str, providers: dict[str, Provider]) -> Provider:
    """``preferred`` = auto | btrfs | lvm | copy; auto picks btrfs, then LVM thin, then copy."""
    if preferred != "auto":
        p = providers.get(preferred)
        if p is None:
            raise DtakeError(E.INVALID_OPTION, f"unknown snapshot provider {preferred!r}")
        if not p.supports(path):
            raise DtakeError(
                E.NOT_SUPPORTED, f"snapshot provider {preferred} cannot snapshot {path}"
            )
        return p
    for name in ("btrfs", "lvm"):
        p = providers.get(name)
        if p is not None and p.supports(path):
            return p
    return providers["copy"]


def new_id(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)


Clock = Callable[[], float]


class SnapshotManager:
    """The target node's snapshots: what the control commands and the agents call.

    ``target`` arguments name a copy by connection uuid or by target path (a path with
    no connection is allowed too, e.g. a ReplicatedDisk directory on its active node).
    """

    def __init__(
        self,
        svc: Service,
        *,
        runner: Runner | None = None,
        clock: Clock = time.time,
        snap_dir: str | None = None,
        provider: str = "auto",
        max_keep: int = MAX_SNAPSHOTS,
        timeout_s: float = CREATE_TIMEOUT_S,
    ) -> None:
        self.svc = svc
        self.runner: Runner = runner or SubprocessRunner()
        self.clock = clock
        self.preferred = provider
        self.max_keep = max(1, min(int(max_keep), MAX_SNAPSHOTS))
        self.timeout_s = timeout_s
        sdir = snap_dir or os.path.join(svc.cfg.state_dir, "snapshots")
        self.providers: dict[str, Provider] = {
            "copy": CopyProvider(self.runner, sdir),
            "btrfs": BtrfsProvider(self.runner),
            "lvm": LvmThinProvider(self.runner, os.path.join(sdir, ".mnt")),
        }
        self._lock = threading.RLock()  # one snapshot at a time [L5654]
        doc = svc.store.load("snapshots.json", {}) or {}
        self.records: list[SnapshotRecord] = [SnapshotRecord(**r) for r in doc.get("records", [])]
        self.schedules: dict[str, Schedule] = {
            k: Schedule(**v) for k, v in (doc.get("schedules") or {}).items()
        }

    # ------------------------------------------------------------------ helpers
    def _save(self) -> None:
        with self._lock:
            doc = {
                "records": [r.to_dict() for r in self.records],
                "schedules": {k: v.to_dict() for k, v in self.schedules.items()},
            }
        self.svc.store.save("snapshots.json", doc)

    def resolve(self, target: str) -> tuple[str, TargetState | None]:
        """Connection uuid or target path -> (normalised path, its TargetState or None)."""
        states = self.svc.target.states
        st = states.get(target)
        if st is not None:
            return os.path.normpath(st.target_path), st
        if not target.startswith("/"):
            raise DtakeError(E.NO_TARGET, f"no target copy {target!r} on {self.svc.node_id}")
        p = os.path.normpath(target)
        for s in list(states.values()):
            if os.path.normpath(s.target_path) == p:
                return p, s
        if not self.svc.cfg.target_path_allowed(p) or not os.path.isdir(p):
            raise DtakeError(E.NO_TARGET, f"no target copy at {p} on {self.svc.node_id}")
        return p, None

    def _blocker(self) -> Any:
        feat = self.svc.features.get("dtake.service.datafeatures")
        return getattr(feat, "blocker", None)

    def _writable(self, path: str, *, for_child: bool) -> str:
        b = self._blocker()
        return b.writable_path(path, for_child=for_child) if b is not None else path

    def _event_args(self, path: str, st: TargetState | None) -> dict[str, Any]:
        return {
            "source": st.source_node if st else self.svc.node_id,
            "source_ip": st.source_node if st else path,
            "con_id": st.conn_id if st else 0,
        }

    def for_target(self, path: str) -> list[SnapshotRecord]:
        return [r for r in self.records if r.target_path == path]

    # ------------------------------------------------------------------ API
    def take(
        self,
        target: str,
        *,
        kind: str = "manual",
        reason: str = "",
        locked: bool = False,
    ) -> dict[str, Any]:
        if kind not in KINDS:
            raise DtakeError(E.INVALID_OPTION, f"snapshot kind must be one of {KINDS}")
        path, st = self.resolve(target)
        quiesce = st.lock if (st is not None and not locked) else contextlib.nullcontext()
        with quiesce, self._lock:  # between two batches of applied ops
            now = self.clock()
            rec = SnapshotRecord(
                id=new_id(now),
                target_path=path,
                kind=kind,
                provider="",
                location="",
                created=now,
                uuid=st.uuid if st else "",
                conn_id=st.conn_id if st else 0,
                data_state=str(getattr(st, "data_state", "")) if st else "",
                reason=reason,
            )
            try:
                prov = select_provider(path, self.preferred, self.providers)
                rec.provider = prov.name
                if st is not None and st.tree is not None:
                    with contextlib.suppress(OSError):
                        st.tree.sync()
                prov.create(self._writable(path, for_child=True), rec, timeout=self.timeout_s)
            except (DtakeError, OSError) as exc:
                self.svc.events.emit(4400, error=str(exc), **self._event_args(path, st))
                if isinstance(exc, DtakeError):
                    raise
                raise DtakeError(E.UNKNOWN, f"snapshot of {path} failed: {exc}") from exc
            self.records.append(rec)
            for old in prune(self.for_target(path), max_keep=self.max_keep):
                if old.id != rec.id:
                    self._delete_rec(old, st)
            self._save()
        log.info("snapshot %s of %s taken (%s, %s)", rec.id, path, kind, rec.provider)
        return rec.to_dict()

    def take_auto(self, st: TargetState, *, reason: str, locked: bool) -> dict[str, Any] | None:
        """The automatic snapshot before a good -> bad transition; never raises."""
        try:
            return self.take(st.uuid, kind="auto", reason=reason, locked=locked)
        except DtakeError as exc:
            log.error("automatic snapshot of %s failed: %s", st.target_path, exc)
            return None

    def list(self, target: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            recs = list(self.records)
        if target:
            path, _ = self.resolve(target)
            recs = [r for r in recs if r.target_path == path]
        return [r.to_dict() for r in sorted(recs, key=lambda r: (r.target_path, r.created))]

    def _find(self, path: str, snap_id: str) -> SnapshotRecord:
        """By id, or "latest", or "last-good" (taken while the data state was OK)."""
        mine = sorted(self.for_target(path), key=lambda r: (r.created, r.id))
        if snap_id == "latest" and mine:
            return mine[-1]
        if snap_id == "last-good":
            good = [r for r in mine if r.data_state == "OK"]
            if good:
                return good[-1]
        for r in mine:
            if r.id == snap_id:
                return r
        raise DtakeError(E.INVALID_PARAMETER, f"no snapshot {snap_id!r} of {path}")

    def _delete_rec(self, rec: SnapshotRecord, st: TargetState | None) -> None:
        try:
            self.providers[rec.provider].delete(rec)
        except (DtakeError, OSError, KeyError) as exc:
            self.svc.events.emit(
                4401 if rec.kind == "auto" else 4402,
                error=str(exc),
                **self._event_args(rec.target_path, st),
            )
            raise DtakeError(E.UNKNOWN, f"snapshot {rec.id} not deleted: {exc}") from exc
        self.records = [r for r in self.records if r is not rec]

    def delete(self, target: str, snapshot: str) -> dict[str, Any]:
        path, st = self.resolve(target)
        with self._lock:
            rec = self._find(path, snapshot)
            self._delete_rec(rec, st)
            self._save()
        return {"id": rec.id, "deleted": True}

    def revert(self, target: str, snapshot: str) -> dict[str, Any]:
        """Replace the target copy with a snapshot; the data state becomes Snapshot
        Reverted (written before the data changes) [L5621, L5652]."""
        from dtake.service import datastate

        path, st = self.resolve(target)
        with self._lock:
            rec = self._find(path, snapshot)
        if st is not None:
            datastate.target_event(
                self.svc,
                st,
                datastate.DataEvent.SNAPSHOT_REVERTED,
                reason=f"snapshot {rec.id} reverted",
            )
            # The source must learn the new state before sending anything else: end the
            # session; its reconnect is answered with Snapshot Reverted.
            sess = getattr(st, "session", None)
            if sess is not None:
                with contextlib.suppress(OSError):
                    sess.close()
        quiesce = st.lock if st is not None else contextlib.nullcontext()
        with quiesce, self._lock, self.providers[rec.provider].view(rec) as view:
            n = revert_into(
                self.runner,
                view,
                self._writable(path, for_child=True),
                timeout=max(self.timeout_s, 3600.0),
            )
        log.info("snapshot %s reverted onto %s (%d entries)", rec.id, path, n)
        return {
            "id": rec.id,
            "target_path": path,
            "reverted": True,
            "data_state": getattr(st, "data_state", None) if st else None,
        }

    # ------------------------------------------------------------------ schedules
    def schedule(
        self,
        target: str,
        *,
        interval_min: float | None = None,
        start: float | None = None,
        enabled: bool | None = None,
        remove: bool = False,
    ) -> dict[str, Any]:
        path, st = self.resolve(target)
        args = self._event_args(path, st)
        with self._lock:
            sch = self.schedules.get(path)
            if remove:
                if sch is not None:
                    del self.schedules[path]
                    self.svc.events.emit(4405, **args)
                self._save()
                return {"target_path": path, "schedule": None}
            if interval_min is not None or sch is None:
                now = self.clock()
                sch = Schedule(
                    interval_s=float(interval_min if interval_min is not None else 60) * 60,
                    next_due=float(start) if start is not None else now,
                    enabled=True if enabled is None else bool(enabled),
                )
                self.schedules[path] = sch
                self.svc.events.emit(
                    4404,
                    minutes=f"{sch.interval_s / 60:g}",
                    next=time.strftime("%m/%d/%Y %I:%M:%S %p", time.localtime(sch.next_due)),
                    **args,
                )
            elif enabled is not None and enabled != sch.enabled:
                sch.enabled = bool(enabled)
                self.svc.events.emit(4406 if sch.enabled else 4407, **args)
            self._save()
            return {"target_path": path, "schedule": sch.to_dict()}

    def tick(self) -> builtins.list[str]:
        """Evaluate the schedules once (the service calls this every second)."""
        from dtake.service import datastate

        taken: builtins.list[str] = []
        now = self.clock()
        with self._lock:
            items = list(self.schedules.items())
        changed = False
        for path, sch in items:
            try:
                _, st = self.resolve(path)
            except DtakeError:
                continue
            good = datastate.is_good(str(getattr(st, "data_state", "OK"))) if st else True
            before = sch.to_dict()
            action = sch.tick(now, good)
            changed = changed or before != sch.to_dict()
            if action == "delay":
                self.svc.events.emit(4403, **self._event_args(path, st))
            elif action == "take":
                try:
                    taken.append(self.take(path, kind="scheduled")["id"])
                except DtakeError as exc:
                    log.error("scheduled snapshot of %s failed: %s", path, exc)
        if changed:
            self._save()
        return taken

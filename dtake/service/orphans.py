"""Orphan files: on the target, not on the source [L5064-5095].

Modes: off, log (to the target log), delete, move (to the TARGET's orphan folder,
``data_safety.orphans.move_dir``, default ``<state_dir>/orphans``; files keep their
relative path under ``<move_dir>/<connection uuid>/``). The folder is a target setting
(the seed configures orphans per target) and never comes from the peer: a peer that
could name it could move files anywhere. An age filter handles only orphans not
modified within ``age_s`` seconds ("Remove Orphans not modified within" [L5094]).

Runs on mirror, verify and restore, never at connect time. The source decides what is
an orphan (target scan minus the source walk) and re-checks each candidate on its own
disk just before asking, then the target acts only on entries whose kind, size and
mtime still match what it scanned (so a file that replication re-created in between is
left alone), confined beneath the target root through the tree's directory fds.

Selection follows the seed's warning [L5088-5092]: an explicit (wildcard-free) exclude
protects target-only data; a wildcard exclude does NOT.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtake.errors import DtakeError

if TYPE_CHECKING:
    from dtake.service.apply import TargetTree
    from dtake.service.source import Connection

__all__ = [
    "MODES",
    "OrphanResult",
    "candidates",
    "process_orphans",
    "select_by_age",
    "target_process",
]

log = logging.getLogger("dtake.orphans")

MODES = ("off", "log", "delete", "move")


@dataclass
class OrphanResult:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    skipped_age: int = 0
    failed: int = 0
    logged: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def select_by_age(
    entries: list[tuple[str, str, int, int]], *, age_s: float, now: float
) -> tuple[list[tuple[str, str, int, int]], int]:
    """Keep orphans not modified within ``age_s`` (0 = all); returns (kept, skipped)."""
    if age_s <= 0:
        return list(entries), 0
    cutoff_ns = int((now - age_s) * 1e9)
    kept = [e for e in entries if e[3] < cutoff_ns]
    return kept, len(entries) - len(kept)


def _protected(conn: Connection, path: str, is_dir: bool) -> bool:
    """True when an explicit exclude or no include covers ``path``."""
    rule = conn.rules.decide(path, is_dir=is_dir)
    if rule is None:
        # Inside the set's base but covered by no rule: not ours to touch.
        return not conn.rules.matches(path, is_dir=is_dir)
    if rule.include:
        return False
    return not any(c in rule.path for c in "*?")  # only explicit excludes protect


def candidates(
    conn: Connection, target: Mapping[str, tuple[str, int, int]], seen: set[str]
) -> list[tuple[str, str, int, int]]:
    """(path, kind, size, mtime_ns) of target entries the source does not have."""
    out: list[tuple[str, str, int, int]] = []
    for p in sorted(target):
        if p in seen or p == "":
            continue
        kind, size, mtime = target[p]
        src = os.path.join(conn.base, p)
        if os.path.lexists(src):
            continue  # appeared since the walk: replication sends it
        if _protected(conn, src, kind == "d"):
            continue
        out.append((p, kind, size, mtime))
    return out


def process_orphans(
    conn: Connection, target: Mapping[str, tuple[str, int, int]], seen: set[str]
) -> dict[str, Any]:
    """Source side: find the orphans and ask the target to handle them (in-band)."""
    mode = conn.rec.orphans
    if mode not in MODES or mode == "off":
        return {}
    ents = candidates(conn, target, seen)
    svc = conn.svc
    args = {"target": conn.label, "repset": conn.rec.repset, "con_id": conn.rec.id}
    svc.events.emit(4048, **args)
    prev = conn.mirror_status
    conn.mirror_status = "Removing Orphans"
    try:
        chunks = conn._request(
            "orphans",
            mode=mode,
            age_s=float(getattr(conn.rec, "orphans_age_s", 0) or 0),
            entries=[list(e) for e in ents],
        )
        res = {k: v for k, v in chunks[-1].items() if k not in ("id", "more")}
    except DtakeError as exc:
        svc.events.emit(4051, **args)
        log.warning("connection %d: orphan task failed: %s", conn.rec.id, exc)
        return {"error": str(exc)}
    finally:
        if conn.mirror_status == "Removing Orphans":
            conn.mirror_status = prev
    for k in ("files", "dirs", "bytes"):
        conn.stats[f"orphan_{k}"] = conn.stats.get(f"orphan_{k}", 0) + int(res.get(k, 0))
    svc.events.emit(4052, **args)
    log.info("connection %d: orphans (%s): %s", conn.rec.id, mode, res)
    return res


# ---------------------------------------------------------------------------- target side
def _move_out(dir_fd: int, name: str, dest: str) -> None:
    """Move ``name`` (in ``dir_fd``) to the absolute ``dest``, across filesystems too."""
    os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
    if os.path.lexists(dest):
        dest = f"{dest}.{time.time_ns()}"
    try:
        os.rename(name, dest, src_dir_fd=dir_fd)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    st = os.lstat(name, dir_fd=dir_fd)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dir_fd), dest)
    else:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            with open(fd, "rb", closefd=False) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(dest, stat.S_IMODE(st.st_mode))
            os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)
    os.unlink(name, dir_fd=dir_fd)


def target_process(
    tree: TargetTree,
    req: Mapping[str, Any],
    *,
    move_dir: str,
    uuid: str,
    now: Callable[[], float] = time.time,
    emit: Callable[..., Any] | None = None,
) -> OrphanResult:
    """Target side of an ``orphans`` request; confined to ``tree``."""
    from dtake.service.apply import split_rel

    mode = str(req.get("mode", "log"))
    res = OrphanResult()
    raw = [
        (str(e[0]), str(e[1]), int(e[2]), int(e[3]))
        for e in req.get("entries") or []
        if isinstance(e, list | tuple) and len(e) == 4
    ]
    ents, res.skipped_age = select_by_age(raw, age_s=float(req.get("age_s", 0)), now=now())
    # Files first, then directories deepest first (they may be empty by then).
    ents.sort(key=lambda e: (e[1] == "d", -e[0].count("/"), e[0]))
    for path, kind, size, mtime in ents:
        try:
            parts = split_rel(path)
            with tree._parent(parts, create=False) as d:
                if d is None:
                    continue
                st = os.lstat(parts[-1], dir_fd=d)
                k = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
                if k != kind or (k == "f" and (st.st_size != size or st.st_mtime_ns != mtime)):
                    continue  # changed since the scan: replication owns it now
                if mode == "log":
                    log.info("orphan %s on %s", path, tree.root)
                    res.logged += 1
                    continue
                if k == "d":
                    if mode == "move":
                        os.makedirs(os.path.join(move_dir, uuid, path), mode=0o700, exist_ok=True)
                    try:
                        os.rmdir(parts[-1], dir_fd=d)
                    except OSError as exc:
                        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                            continue  # holds something recent or protected
                        raise
                    res.dirs += 1
                    continue
                if mode == "move":
                    _move_out(d, parts[-1], os.path.join(move_dir, uuid, path))
                else:
                    os.unlink(parts[-1], dir_fd=d)
                res.files += 1
                res.bytes += st.st_size if k == "f" else 0
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            res.failed += 1
            log.warning("orphan %s not %s: %s", path, "moved" if mode == "move" else "deleted", exc)
    if res.failed and emit is not None:
        with contextlib.suppress(Exception):
            emit(4408 if mode == "move" else 4409)
    # The seed's log says "deleted" even when files were moved; we log the true action.
    log.info(
        "orphans on %s: %d files, %d directories, %d bytes %s",
        tree.root,
        res.files,
        res.dirs,
        res.bytes,
        {"move": "moved", "delete": "deleted"}.get(mode, "logged"),
    )
    return res

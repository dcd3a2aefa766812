"""Restore: copy the target's copy back to the source (`dtake restore ID`) [L4674-4800].

The seed's restoration is a mirror with the roles swapped (named ``(<RS>_Restore)``),
with the same orphan options [L4719, seed-engine.md §9]. Here the source service pulls
over the existing authenticated connection: it asks the target for a scan, reads the
files that differ (``read`` requests, confined on the target) and writes them beneath the
replication set's base through a :class:`~dtake.service.apply.TargetTree`, so a peer's
paths get the same confinement as any replicated op. Orphans on the source (files the
target does not have) follow the connection's orphan mode, with its age filter.

While restoring, the connection's capture is suspended (the restored writes must not be
replicated straight back) and the mirror status shows "Restoring"; ``restore`` in the
connection's status gives the progress (files and bytes done of the totals, from the
target's scan), kept after the end with the outcome.

Then the source is compared with the target's copy again (attributes: a second scan).
Anything that differs was changed on the source during the restore, by a process the
seed tells the operator to stop first [L4696]; capture was suspended, so it would never
reach the target. Instead of declaring the copy good, a difference mirror source ->
target is started: the data state then goes OK only when that mirror completes. Without
differences the data state becomes OK on both sides at once (Restore Complete [L5625];
it also clears Restore Required and Snapshot Reverted) and replication resumes.
Events 97/98, 4053/4056/4057.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from typing import TYPE_CHECKING, Any

from dtake.errors import DtakeError, E
from dtake.ops import Op, OpKind
from dtake.service import datastate
from dtake.service.orphans import select_by_age

if TYPE_CHECKING:
    from dtake.service.source import Connection

__all__ = ["restore_connection"]

log = logging.getLogger("dtake.restore")

CHUNK = 1 << 20


def _needs(mode: str, t: dict[str, Any], s: os.stat_result | None) -> bool:
    if s is None or mode == "full":
        return True
    kind = "d" if stat.S_ISDIR(s.st_mode) else "l" if stat.S_ISLNK(s.st_mode) else "f"
    if kind != t["kind"]:
        return True
    if kind == "f":
        return bool(s.st_size != t["size"] or s.st_mtime_ns != t["mtime_ns"])
    return False


def restore_connection(
    conn: Connection, *, mode: str = "differences", orphans: str | None = None
) -> dict[str, Any]:
    from dtake.service.apply import TargetTree

    if mode not in ("full", "differences"):
        raise DtakeError(E.INVALID_OPTION, "restore mode must be full or differences")
    orphan_mode = orphans or conn.rec.orphans
    if orphan_mode not in ("off", "log", "delete", "move"):
        raise DtakeError(E.INVALID_OPTION, "orphans must be off, log, delete or move")
    if conn._fs is None:
        raise DtakeError(E.CONNECTION_FAILED, f"connection {conn.rec.id} is not connected")
    if conn.mirror_status != "Idle" and conn.rec.target_data_state in datastate.HOLD:
        # Started before the source learnt Restore Required (a restart after a failover):
        # held, it could never finish [L5623]; the restore replaces it.
        conn.stop_mirror()
    if conn.mirror_status != "Idle":
        raise DtakeError(E.MIRROR_ACTIVE, "Mirror currently active: restore cannot start")
    svc = conn.svc
    ev = {"target": conn.label, "repset": f"({conn.rec.repset}_Restore)", "con_id": conn.rec.id}
    svc.events.emit(97, con_id=conn.rec.id)
    svc.events.emit(4053, **ev)
    prev_repl = conn.replication
    conn.replication = "Stopped"  # capture suspended: no echo of restored writes
    conn.mirror_status = "Restoring"
    counts = {"files": 0, "bytes": 0, "dirs": 0, "links": 0, "orphans": 0, "skipped": 0}
    progress: dict[str, Any] = {"state": "scanning", "mode": mode, "started": time.time()}
    conn.restore_progress = progress  # type: ignore[attr-defined]  # read by tx.status_fields
    tree = TargetTree(conn.base)
    try:
        entries = conn.request_scan()
        have = {e["path"] for e in entries}
        if not (have - {""}) and any(conn.rel(p) for p, _st in conn._walk(conn.base)):
            # An empty listing of a copy the source has data for is far likelier a fault
            # on the target than the truth; a restore would empty the source.
            raise DtakeError(
                E.NO_TARGET,
                f"the target's copy of connection {conn.rec.id} lists nothing: restore "
                "refused (it would empty the source); check the target path",
            )
        progress.update(
            state="restoring",
            files_total=sum(1 for e in entries if e["kind"] == "f"),
            bytes_total=sum(int(e["size"]) for e in entries if e["kind"] == "f"),
            files_done=0,
            bytes_done=0,
        )
        dirs: list[dict[str, Any]] = []
        for t in entries:
            rel = t["path"]
            if not rel:
                continue
            src = os.path.join(conn.base, rel)
            try:
                s: os.stat_result | None = os.lstat(src)
            except FileNotFoundError:
                s = None
            if not _needs(mode, t, s):
                counts["skipped"] += 1
                if t["kind"] == "d":
                    dirs.append(t)
                elif t["kind"] == "f":
                    progress["files_done"] += 1
                    progress["bytes_done"] += int(t["size"])
                continue
            if s is not None and t["kind"] != (
                "d" if stat.S_ISDIR(s.st_mode) else "l" if stat.S_ISLNK(s.st_mode) else "f"
            ):
                tree.apply(Op(OpKind.DELETE, rel))
            if t["kind"] == "d":
                tree.apply(Op(OpKind.MKDIR, rel, mode=t["mode"], uid=t["uid"], gid=t["gid"]))
                dirs.append(t)
                counts["dirs"] += 1
            elif t["kind"] == "l":
                tree.apply(Op(OpKind.SYMLINK, rel, link=t["link"], uid=t["uid"], gid=t["gid"]))
                counts["links"] += 1
            else:
                tree.apply(Op(OpKind.FILE_BEGIN, rel))
                off = 0
                size = int(t["size"])
                while off < size:
                    chunk = conn._request("read", path=rel, offset=off, length=CHUNK)[-1]
                    data = bytes(chunk.get("data") or b"")
                    if not data:
                        break
                    tree.apply(Op(OpKind.WRITE, rel, offset=off, data=data))
                    off += len(data)
                    progress["bytes_done"] += len(data)
                tree.apply(
                    Op(
                        OpKind.FILE_END,
                        rel,
                        size=off,
                        mode=t["mode"],
                        uid=t["uid"],
                        gid=t["gid"],
                        mtime_ns=t["mtime_ns"],
                    )
                )
                counts["files"] += 1
                counts["bytes"] += off
                progress["files_done"] += 1
        if orphan_mode != "off":
            counts["orphans"] = _source_orphans(conn, tree, have, orphan_mode)
        # Directory times last (writing inside them changed them), deepest first.
        for t in sorted(dirs, key=lambda d: -d["path"].count("/")):
            tree.apply(
                Op(
                    OpKind.ATTRS,
                    t["path"],
                    mode=t["mode"],
                    uid=t["uid"],
                    gid=t["gid"],
                    mtime_ns=t["mtime_ns"],
                )
            )
        progress["state"] = "checking"
        changed = _changed_since(conn)
    except BaseException as exc:
        svc.events.emit(4056, **ev)
        progress.update(state="failed", error=str(exc), ended=time.time())
        conn.mirror_status = "Idle"
        conn.replication = prev_repl
        raise
    finally:
        tree.close()
    conn._sigs.clear()
    conn._sig_blocks = 0
    time.sleep(0.3)  # let inotify deliver the restore's own events while suspended
    conn.mirror_status = "Idle"
    conn.replication = "Replicating" if prev_repl in ("Stopped", "Pending") else prev_repl
    datastate.source_event(conn, datastate.DataEvent.RESTORE_COMPLETE, "restore completed")
    # The target may hold Restore Required / Snapshot Reverted while this side already
    # recorded OK (set there by a failover or a revert, learnt here only on reconnect):
    # say it in so many words, before any mirror, or the target keeps dropping ops.
    try:
        r = conn._request(
            "data_state", state=datastate.OK, override=True, reason="Restore Complete"
        )
        progress["target_data_state"] = r[-1].get("data_state")
    except Exception as exc:  # the next open carries the state (datastate.notify_target)
        log.warning("restore of connection %d: target state not confirmed: %s", conn.rec.id, exc)
    if changed:
        # Changed on the source during the restore and never captured: send them.
        log.warning(
            "restore of connection %d: %d path(s) changed on the source meanwhile "
            "(e.g. %s): difference mirror to the target",
            conn.rec.id,
            len(changed),
            changed[0],
        )
        conn.start_mirror("differences", restart=True)
    progress.update(state="done", changed_during=len(changed), ended=time.time())
    svc.events.emit(98, con_id=conn.rec.id)
    svc.events.emit(4057, **ev)
    return {
        "id": conn.rec.id,
        "mode": mode,
        "orphans_mode": orphan_mode,
        **counts,
        "changed_during": len(changed),
        "remirror": bool(changed),
    }


def _changed_since(conn: Connection) -> list[str]:
    """Paths where the source differs from the target's copy after the restore: kind,
    size and mtime of files, and entries one side lacks."""
    target = {e["path"]: e for e in conn.request_scan() if e["path"]}
    out: list[str] = []
    seen: set[str] = set()
    for path, st in conn._walk(conn.base):
        rel = conn.rel(path)
        if not rel:
            continue
        seen.add(rel)
        t = target.get(rel)
        kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
        if t is None:
            # Created during the restore, or an orphan kept (orphans off/log): either
            # way the target lacks it and a mirror must send it.
            out.append(rel)
        elif t["kind"] != kind or (
            kind == "f" and (t["size"] != st.st_size or t["mtime_ns"] != st.st_mtime_ns)
        ):
            out.append(rel)
    out += sorted(p for p in target if p not in seen)  # deleted on the source meanwhile
    return out


def _source_orphans(conn: Connection, tree: Any, have: set[str], mode: str) -> int:
    """Files on the source that the target copy does not have [L4719: same options]."""
    feat = conn.svc.features.get("dtake.service.datafeatures")
    move_dir = str(getattr(getattr(feat, "cfg", None), "orphans_move_dir", "")) or os.path.join(
        conn.svc.cfg.state_dir, "orphans"
    )
    cands: list[tuple[str, str, int, int]] = []
    for path, st in conn._walk(conn.base):
        rel = conn.rel(path)
        if not rel or rel in have:
            continue
        kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
        cands.append((rel, kind, st.st_size, st.st_mtime_ns))
    kept, _ = select_by_age(cands, age_s=float(conn.rec.orphans_age_s or 0), now=time.time())
    n = 0
    for rel, kind, _size, _m in sorted(kept, key=lambda e: (e[1] == "d", -e[0].count("/"))):
        src = os.path.join(conn.base, rel)
        if mode == "log":
            log.info("restore: orphan on the source: %s", src)
            n += 1
            continue
        try:
            if kind == "d":
                os.rmdir(src)
            elif mode == "move":
                dest = os.path.join(move_dir, f"{conn.rec.uuid}-restore", rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(src, dest)
            else:
                tree.apply(Op(OpKind.DELETE, rel))
            n += 1
        except OSError as exc:
            log.info("restore: orphan %s left: %s", src, exc)
    return n

"""Verification: compare the source tree with the target copy [L5260-5300].

By attributes (type, size, mtime, mode, owner, link target) or, with ``checksum``, by
block hashes of every regular file. With ``remirror`` the differing files are queued
again (a difference mirror restricted to what verification found).
"""

from __future__ import annotations

import os
import stat
import time
from typing import TYPE_CHECKING, Any

import xxhash

from dtake.errors import DtakeError, E
from dtake.service.queue import LazyKind
from dtake.service.source import BLOCK

if TYPE_CHECKING:
    from dtake.service.source import Connection

__all__ = ["verify_connection"]


def _local_hashes(path: str) -> list[int]:
    out: list[int] = []
    with open(path, "rb", buffering=0) as fh:
        while True:
            data = fh.read(BLOCK)
            if not data:
                return out
            out.append(xxhash.xxh3_64_intdigest(data))


def verify_connection(conn: Connection, *, remirror: bool, checksum: bool) -> dict[str, Any]:
    if conn.mirror_status not in ("Idle",):
        raise DtakeError(E.MIRROR_ACTIVE, "Mirror currently active: verification cannot start")
    started = time.time()
    prev = conn.mirror_status
    conn.mirror_status = "Verifying"
    try:
        target = {e["path"]: e for e in conn.request_scan()}
        differences: list[dict[str, Any]] = []
        seen: set[str] = set()
        files = 0
        for path, st in conn._walk(conn.base):
            rel = conn.rel(path)
            if rel is None:
                continue
            seen.add(rel)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            if kind == "f":
                files += 1
                if st.st_nlink > 1:
                    continue  # hard links are not replicated [L3756]
            t = target.get(rel)
            reason = None
            if t is None:
                reason = "missing on target"
            elif t["kind"] != kind:
                reason = f"type differs ({kind} vs {t['kind']})"
            elif kind == "l":
                if t.get("link") != os.readlink(path):
                    reason = "link target differs"
            elif kind == "f" and t["size"] != st.st_size:
                reason = f"size differs ({st.st_size} vs {t['size']})"
            elif kind == "f" and t["mtime_ns"] != st.st_mtime_ns:
                reason = "date/time differs"
            elif (
                kind != "l" and t.get("mode") is not None and t["mode"] != stat.S_IMODE(st.st_mode)
            ):
                reason = "permissions differ"
            elif kind != "l" and (t.get("uid"), t.get("gid")) != (st.st_uid, st.st_gid):
                reason = "owner differs"
            elif kind == "f" and checksum:
                chunks = conn._request("hashes", path=rel, block_size=BLOCK)
                if _local_hashes(path) != list(chunks[-1].get("hashes") or []):
                    reason = "checksum differs"
            if reason:
                differences.append({"path": rel, "reason": reason})
                if remirror:
                    lazy = {"f": LazyKind.CONTENT, "d": LazyKind.MKDIR, "l": LazyKind.SYMLINK}[kind]
                    conn.queue.put_lazy(lazy, path, mode="full" if kind == "f" else "realtime")
        orphans = sorted(p for p in target if p not in seen)
    finally:
        conn.mirror_status = prev if prev != "Verifying" else "Idle"
    return {
        "id": conn.rec.id,
        "checksum": checksum,
        "files_checked": files,
        "differences": differences,
        "different": len(differences),
        "orphans": orphans,
        "remirrored": len(differences) if remirror else 0,
        "seconds": round(time.time() - started, 3),
    }

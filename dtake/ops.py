"""Replication operations: the unit that flows source -> queue -> wire -> target.

An op names its file by a path *relative to the connection's base* (POSIX, no leading
slash, no ``..``): the source strips the replication set's base directory, the target
joins it beneath the connection's target root (see ``dtake.service.apply``).

Whole-file transfers are ``FILE_BEGIN`` / ``WRITE``... / ``FILE_END``: the target writes a
temporary file in the same directory and renames it over the final name at ``FILE_END``,
so no half-written file is ever visible under its final name. Sparse files are sent as
``WRITE`` ops for the data extents only plus the final size, so holes stay holes.

A mirror sends the small files of a directory as one ``FILES`` op (only to a target that
announced the "files" feature when the connection opened); the target expands it into
the ``FILE_END`` ops it stands for, so everything after the wire is per file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Op", "OpKind"]


class OpKind(enum.IntEnum):
    MKDIR = 1  # path, mode/uid/gid/mtime_ns
    FILE_BEGIN = 2  # path: start a whole-file transfer into a temp file
    WRITE = 3  # path, offset, data: write a range (in a FILE_BEGIN transfer, or in place)
    FILE_END = (
        4  # path, size, mode/uid/gid/mtime_ns: truncate to size, set attrs, rename into place
    )
    TRUNCATE = 5  # path, size
    RENAME = 6  # path -> new_path (files or whole directories)
    DELETE = 7  # path (a file, a symlink, or a directory tree)
    ATTRS = 8  # path, mode/uid/gid/mtime_ns (any of them may be None)
    SYMLINK = 9  # path, link target (stored as-is, never followed)
    BARRIER = 10  # no-op with a sequence number: mirror start/end markers, idle probes
    SETSIZE = 11  # path, size: in-place file whose length changed (extend/shrink)
    # path (a directory), tags["files"]: [[name, size, mode, uid, gid, mtime_ns], ...],
    # data: their contents back to back. Small files of one directory from a mirror, in
    # one op that takes one sequence number per file (seq is the first): the target
    # applies it as that many FILE_END ops tagged "whole" (dtake.protocol.opwire).
    FILES = 12


@dataclass(slots=True)
class Op:
    kind: OpKind
    path: str = ""
    seq: int = 0
    new_path: str | None = None
    offset: int = 0
    data: bytes = b""
    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    link: str | None = None
    # Free-form tags: "mirror" for ops produced by a mirror (never overwrite newer
    # replicated data), "origin" to stop active/active echo loops.
    tags: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        """Compact list form for msgpack (stable field order; protocol version 1)."""
        return [
            int(self.kind),
            self.path,
            self.seq,
            self.new_path,
            self.offset,
            self.data,
            self.size,
            self.mode,
            self.uid,
            self.gid,
            self.mtime_ns,
            self.link,
            self.tags or None,
        ]

    @classmethod
    def from_wire(cls, item: list[Any]) -> Op:
        if not isinstance(item, list) or len(item) != 13:
            raise ValueError("malformed op")
        kind, path, seq, new_path, offset, data, size, mode, uid, gid, mtime_ns, link, tags = item
        return cls(
            kind=OpKind(kind),
            path=str(path),
            seq=int(seq),
            new_path=None if new_path is None else str(new_path),
            offset=int(offset),
            data=bytes(data),
            size=None if size is None else int(size),
            mode=None if mode is None else int(mode),
            uid=None if uid is None else int(uid),
            gid=None if gid is None else int(gid),
            mtime_ns=None if mtime_ns is None else int(mtime_ns),
            link=None if link is None else str(link),
            tags=dict(tags) if tags else {},
        )

    def span(self) -> int:
        """Sequence numbers this op takes: one per file for FILES, else one."""
        if self.kind is OpKind.FILES:
            return len(self.tags.get("files") or ()) or 1
        return 1

    def wire_size(self) -> int:
        """Approximate bytes this op costs in a queue (for memory limits)."""
        return 64 + len(self.path) + len(self.new_path or "") + len(self.data)

"""OPS frames with their data as a raw trailer (protocol version 2).

A version-1 OPS payload is one msgpack list of ``Op.to_wire()`` lists, so every data
byte was copied into the msgpack buffer on the source and out of it on the target. An
OPS_DATA frame carries the same lists with the data field replaced by its *length*,
followed by the data of every op, back to back::

    u32 header length (big-endian) | msgpack header | data of op 1 | data of op 2 | ...

The source hands the pieces to ``sendmsg`` as they are (no join), and the target keeps
each op's data as a ``memoryview`` of the received frame (no copy before ``pwrite``).
``decode_ops`` returns exactly what a version-1 OPS frame decodes to (13-field lists),
except that the data fields are memoryviews.

A FILES op (small files of one directory, see ``dtake.ops``) is expanded by
``ops_from_wire`` into the FILE_END ops it stands for: sequence numbers ``seq``,
``seq + 1``, ..., each tagged ``whole``, the first with the op's queue position
(``qo``), the last with its other tags (the early-ACK request). Names are checked here
(one path component each); the paths are confined beneath the target root by the
applier, as for any op.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, cast

import msgpack

from dtake.ops import Op, OpKind
from dtake.protocol.errors import ProtocolError

__all__ = [
    "FILES_FEATURE",
    "decode_ops",
    "encode_ops",
    "expand_files",
    "op_from_wire",
    "ops_from_wire",
]

FILES_FEATURE = "files"  # in a target's open response: it accepts FILES ops

_HLEN = struct.Struct(">I")
_FIELDS = 13
_DATA = 5  # index of the data field in Op.to_wire()
_KINDS: dict[int, OpKind] = {int(k): k for k in OpKind}
_BUFFERS = (bytes, bytearray, memoryview)


def encode_ops(ops: Iterable[Op]) -> list[bytes | memoryview]:
    """The payload of an OPS_DATA frame as a list of pieces (header first)."""
    header: list[list[Any]] = []
    datas: list[bytes | memoryview] = []
    for op in ops:
        data = op.data
        header.append(
            [
                int(op.kind),
                op.path,
                op.seq,
                op.new_path,
                op.offset,
                len(data),
                op.size,
                op.mode,
                op.uid,
                op.gid,
                op.mtime_ns,
                op.link,
                op.tags or None,
            ]
        )
        if data:
            datas.append(data)
    packed = msgpack.packb(header, use_bin_type=True)
    return [_HLEN.pack(len(packed)) + packed, *datas]


def decode_ops(payload: bytes | bytearray) -> list[list[Any]]:
    """Inverse of ``encode_ops``: 13-field op lists whose data fields are memoryviews of
    ``payload``; a malformed payload is a ProtocolError (BAD_PAYLOAD)."""
    view = memoryview(payload)
    if len(view) < _HLEN.size:
        raise ProtocolError("OPS_DATA frame without a header", reason="BAD_PAYLOAD")
    (hlen,) = _HLEN.unpack_from(view)
    pos = _HLEN.size + hlen
    if pos > len(view):
        raise ProtocolError("OPS_DATA header longer than the frame", reason="BAD_PAYLOAD")
    try:
        items = msgpack.unpackb(view[_HLEN.size : pos], raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"undecodable OPS_DATA header: {exc}", reason="BAD_PAYLOAD") from exc
    if not isinstance(items, list):
        raise ProtocolError("OPS_DATA header is not a list", reason="BAD_PAYLOAD")
    end = len(view)
    for item in items:
        if type(item) is not list or len(item) != _FIELDS:
            raise ProtocolError("malformed op in OPS_DATA frame", reason="BAD_PAYLOAD")
        n = item[_DATA]
        if type(n) is not int or n < 0 or pos + n > end:
            raise ProtocolError("op data beyond the end of the frame", reason="BAD_PAYLOAD")
        item[_DATA] = view[pos : pos + n]
        pos += n
    if pos != end:
        raise ProtocolError("trailing bytes after the op data", reason="BAD_PAYLOAD")
    return cast(list[list[Any]], items)


def op_from_wire(item: list[Any]) -> Op:
    """``Op.from_wire`` without copying the data (a memoryview stays a memoryview)."""
    if not isinstance(item, list) or len(item) != _FIELDS:
        raise ValueError("malformed op")
    data = item[_DATA]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError("op data is not bytes")
    op = Op.from_wire([*item[:_DATA], b"", *item[_DATA + 1 :]])
    op.data = cast(bytes, data)
    return op


def ops_from_wire(items: list[Any]) -> list[Op]:
    """``op_from_wire`` for every op of a frame, in order (the applier's hot path: a
    frame holds up to 512 small files). Fields of the exact wire types are taken as
    they are; any other op goes through ``op_from_wire``, which converts it or raises
    ValueError just as before."""
    out: list[Op] = []
    append = out.append
    kinds = _KINDS
    for item in items:
        if type(item) is list and len(item) == _FIELDS:
            kind, path, seq, new_path, offset, data, size, mode, uid, gid, mtime_ns, link, tags = (
                item
            )
            k = kinds.get(kind) if type(kind) is int else None
            if (
                k is not None
                and type(path) is str
                and type(seq) is int
                and type(offset) is int
                and isinstance(data, _BUFFERS)
                and (new_path is None or type(new_path) is str)
                and (size is None or type(size) is int)
                and (mode is None or type(mode) is int)
                and (uid is None or type(uid) is int)
                and (gid is None or type(gid) is int)
                and (mtime_ns is None or type(mtime_ns) is int)
                and (link is None or type(link) is str)
                and (tags is None or type(tags) is dict)
            ):
                # (a memoryview stays one: the applier only needs len() and the buffer)
                buf = cast(bytes, data)
                op = Op(k, path, seq, new_path, offset, buf, size, mode, uid, gid, mtime_ns, link,
                        tags or {})  # fmt: skip
                if k is OpKind.FILES:
                    out.extend(expand_files(op))
                else:
                    append(op)
                continue
        op = op_from_wire(item)
        if op.kind is OpKind.FILES:
            out.extend(expand_files(op))
        else:
            append(op)
    return out


_DOTS = frozenset({".", ".."})


def expand_files(op: Op) -> list[Op]:
    """The FILE_END ops (tagged ``whole``) a FILES op stands for; ValueError when it is
    malformed: no entries, a name that is not one path component, a field of the wrong
    type, or sizes that do not add up to the data."""
    tags = dict(op.tags)
    entries = tags.pop("files", None)
    if type(entries) is not list or not entries:
        raise ValueError("FILES op without entries")
    qo = tags.pop("qo", None)
    data = memoryview(op.data)
    total = len(data)
    base = f"{op.path}/" if op.path else ""
    out: list[Op] = []
    pos = 0
    seq = op.seq
    for entry in entries:
        if type(entry) is not list or len(entry) != 6:
            raise ValueError("malformed FILES entry")
        name, size, mode, uid, gid, mtime_ns = entry
        if type(name) is not str or not name or "/" in name or "\0" in name or name in _DOTS:
            raise ValueError(f"FILES entry name {name!r} is not one path component")
        if (
            type(size) is not int
            or type(mode) is not int
            or type(uid) is not int
            or type(gid) is not int
            or type(mtime_ns) is not int
            or size < 0
        ):
            raise ValueError(f"malformed FILES entry for {name!r}")
        end = pos + size
        if end > total:
            raise ValueError("FILES entry sizes exceed the op data")
        out.append(
            Op(OpKind.FILE_END, base + name, seq, None, 0, cast(bytes, data[pos:end]), size,
               mode, uid, gid, mtime_ns, None, {"whole": 1})
        )  # fmt: skip
        pos = end
        seq += 1
    if pos != total:
        raise ValueError("FILES op data longer than its entries")
    if qo is not None:
        out[0].tags["qo"] = qo
    out[-1].tags.update(tags)
    return out

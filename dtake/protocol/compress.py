"""Per-frame compression codecs: none, zlib (levels 1-9) and zstd (levels 1-19).

The seed's compression is off by default and has a level slider whose range depends on
the algorithms the OS has; an unsupported level is error -153 [L5569-5583, L4378]. Each
frame says which codec compressed it (``FrameSocket`` header flags), so the receiver needs
no negotiation and a sender may change level between frames. The level is not on the wire:
neither decompressor needs it.

Decompression is always bounded by the size the header announced, and that size is checked
against the connection's frame limit first, so a small frame cannot expand into gigabytes.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import Any

from dtake.protocol.errors import CompressionError

_zstd: Any
try:  # zstd is optional: without it the slider simply has fewer choices (seed 4047).
    import zstandard

    _zstd = zstandard
except ImportError:  # pragma: no cover - zstandard is a declared dependency
    _zstd = None

__all__ = [
    "CODEC_IDS",
    "LEVELS",
    "Codec",
    "available_codecs",
    "codec_by_id",
    "get_codec",
]

# Codec ids in the frame header flags (low 4 bits). Never renumber: they are on the wire.
CODEC_IDS: dict[str, int] = {"none": 0, "zlib": 1, "zstd": 2}
# (min, max, default) level per codec.
LEVELS: dict[str, tuple[int, int, int]] = {"zlib": (1, 9, 6), "zstd": (1, 19, 3)}

# zstandard compressor/decompressor objects are not safe for concurrent use; the daemon
# runs one sender thread per connection, so keep one per (thread, level).
_local = threading.local()


def _zstd_compressor(level: int) -> Any:
    cache: dict[int, Any] | None = getattr(_local, "zc", None)
    if cache is None:
        cache = _local.zc = {}
    comp = cache.get(level)
    if comp is None:
        # write_content_size lets the receiver check the size before decompressing.
        comp = cache[level] = _zstd.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _zstd_decompressor() -> Any:
    dec = getattr(_local, "zd", None)
    if dec is None:
        dec = _local.zd = _zstd.ZstdDecompressor()
    return dec


@dataclass(frozen=True, slots=True)
class Codec:
    """One algorithm at one level. ``id`` goes in the frame header."""

    name: str
    level: int

    @property
    def id(self) -> int:
        return CODEC_IDS[self.name]

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        if self.name == "zlib":
            return zlib.compress(data, self.level)
        if self.name == "zstd":
            return bytes(_zstd_compressor(self.level).compress(data))
        return bytes(data)

    def decompress(self, data: bytes | bytearray | memoryview, size: int) -> bytes:
        """Decompress to exactly ``size`` bytes; anything else is a CompressionError."""
        try:
            if self.name == "zlib":
                d = zlib.decompressobj()
                # max_length stops inflation one byte past the bound: a bomb never expands.
                out = d.decompress(data, size + 1)
                if len(out) > size or d.unconsumed_tail or not d.eof:
                    raise CompressionError(
                        "zlib frame does not match its announced size", reason="BAD_COMPRESSED"
                    )
            elif self.name == "zstd":
                # decompress() trusts the content size in the zstd frame header and
                # ignores max_output_size when it is present: check it ourselves first,
                # or a 20-byte frame could ask for gigabytes.
                declared = _zstd.frame_content_size(data)
                if declared > size:
                    raise CompressionError(
                        f"zstd frame declares {declared} bytes, header said {size}",
                        reason="BAD_COMPRESSED",
                    )
                out = bytes(_zstd_decompressor().decompress(data, max_output_size=max(size, 1)))
            else:
                out = bytes(data)
        except CompressionError:
            raise
        except (zlib.error, ValueError, MemoryError) as exc:
            raise CompressionError(
                f"corrupt {self.name} frame: {exc}", reason="BAD_COMPRESSED"
            ) from exc
        except Exception as exc:  # zstandard.ZstdError is not importable without zstandard
            if _zstd is not None and isinstance(exc, _zstd.ZstdError):
                raise CompressionError(
                    f"corrupt {self.name} frame: {exc}", reason="BAD_COMPRESSED"
                ) from exc
            raise
        if len(out) != size:
            raise CompressionError(
                f"{self.name} frame decompressed to {len(out)} bytes, header said {size}",
                reason="BAD_COMPRESSED",
            )
        return out


def available_codecs() -> dict[str, tuple[int, int, int]]:
    """Codecs this host supports with their (min, max, default) levels."""
    return {name: lv for name, lv in LEVELS.items() if name != "zstd" or _zstd is not None}


def get_codec(name: str | None, level: int | None = None) -> Codec | None:
    """The codec for a configured name and level; ``None`` for "none"/""/None (off, the default).

    ``level`` None means the codec's default (zlib 6, zstd 3). Unknown names, levels out
    of range and codecs this host lacks raise CompressionError with the seed's -153 [L4378].
    """
    key = (name or "none").strip().lower()
    if key in ("none", "off", "disabled"):
        return None
    avail = available_codecs()
    if key not in LEVELS:
        raise CompressionError(f"unknown compression algorithm {name!r} (none, zlib, zstd)")
    if key not in avail:
        raise CompressionError(f"compression algorithm {key!r} is not available on this host")
    lo, hi, default = avail[key]
    lvl = default if level is None else level
    if isinstance(lvl, bool) or not isinstance(lvl, int) or not lo <= lvl <= hi:
        raise CompressionError(f"{key} compression level {level!r} is not supported ({lo}-{hi})")
    return Codec(key, lvl)


def codec_by_id(codec_id: int) -> Codec | None:
    """The decoder for a frame's codec id (level is irrelevant for decompression)."""
    if codec_id == 0:
        return None
    for name, cid in CODEC_IDS.items():
        if cid == codec_id and name in available_codecs():
            return Codec(name, LEVELS[name][2])
    raise CompressionError(f"frame uses unknown or unavailable codec id {codec_id}")

"""Checksum verification on real services: whole-file digests find a difference
anywhere in a file, block lists count the bytes out of sync of what differs."""

from __future__ import annotations

import os
from typing import Any

from tests.integration.pair_support import Factory, replicated_pair, write
from tests.service_support import assert_same, settle

BLOCK = 65536


def poke(path: str, offset: int) -> None:
    """Change one byte at ``offset``, keeping size and mtime (attributes see nothing)."""
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def log_block(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().split("--- VERIFICATION OF CONNECTION")[-1]


def test_a_byte_in_a_late_block_of_a_big_file_is_found_and_counted(
    tmp_path: Any, service: Factory
) -> None:
    src = str(tmp_path / "src")
    big_size = 40 * BLOCK + 7  # read in several 1 MiB chunks; a short last block
    write(os.path.join(src, "big.bin"), os.urandom(big_size))
    write(os.path.join(src, "mid.bin"), os.urandom(3 * BLOCK))
    for i in range(30):
        write(os.path.join(src, f"s{i % 3}", f"f{i:02}"), os.urandom(10 + 97 * i))
    src, dst, a, _b, cid = replicated_pair(tmp_path, service)
    assert a.call("verify", con_id=cid, checksum=True)["different"] == 0

    poke(os.path.join(dst, "big.bin"), big_size - 2)  # in the last (short) block
    poke(os.path.join(dst, "mid.bin"), 0)  # the first byte
    poke(os.path.join(dst, "s2", "f29"), 5)
    with open(os.path.join(dst, "s1", "f28"), "ab") as fh:  # size differs too
        fh.write(b"x")
    assert [d["path"] for d in a.call("verify", con_id=cid)["differences"]] == ["s1/f28"]
    r = a.call("verify", con_id=cid, checksum=True)
    reasons = {d["path"]: d["reason"] for d in r["differences"]}
    assert reasons == {
        "big.bin": "checksum differs",
        "mid.bin": "checksum differs",
        "s2/f29": "checksum differs",
        "s1/f28": f"size differs ({10 + 97 * 28} vs {10 + 97 * 28 + 1})",
    }
    last = log_block(r["log"])
    assert "      7 BYTES OUT OF SYNC" in last  # big.bin: its short last block only
    assert f"      {BLOCK} BYTES OUT OF SYNC" in last  # mid.bin: its first block
    assert "Total Files Different: 4" in last
    assert f"Total Bytes Different: {7 + BLOCK + (10 + 97 * 29) + (10 + 97 * 28)}" in last

    r = a.call("verify", con_id=cid, checksum=True, remirror=True)
    assert r["remirrored"] == 4
    settle(a, cid)
    assert_same(src, dst)
    assert a.call("verify", con_id=cid, checksum=True)["different"] == 0

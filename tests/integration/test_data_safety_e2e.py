"""Data safety end to end with real services on loopback: automatic and manual
snapshots with revert, blocked target paths, orphans, restore, verification log.

Every test ends with a tree comparison (dtake.testing.tree_diff). Waits are bounded.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from dtake.testing import ServiceProcess
from tests.service_support import assert_same, settle, until

Factory = Callable[..., ServiceProcess]


def write(path: str, data: bytes | str, *, mtime: float | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def connect(src: ServiceProcess, dst: ServiceProcess, target: str, **kw: Any) -> int:
    r = src.call("connect", repset="rs", host="127.0.0.1", port=dst.port, target_path=target, **kw)
    return int(r["id"])


def setup_pair(tmp_path: Any, service: Factory, **kw: Any) -> tuple[str, str, Any, Any, int]:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a.txt"), "version 1")
    write(os.path.join(src, "d", "b.bin"), os.urandom(200_000))
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    cid = connect(a, b, dst, mirror="full", **kw)
    st = settle(a, cid)
    assert st["target_data_state"] == "OK"
    assert_same(src, dst)
    return src, dst, a, b, cid


def test_good_to_bad_takes_automatic_snapshot(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b, cid = setup_pair(tmp_path, service)
    assert b.call("snapshot_list", target=dst) == []
    states = b.call("data_state", target=dst)
    assert states[0]["data_state"] == "OK"
    # a mirror moves OK -> Mirroring: the target snapshots its good copy first [L5627]
    a.call("mirror", con_id=cid, action="start", mode="full")
    snaps = until(lambda: b.call("snapshot_list", target=dst), "automatic snapshot")
    assert [s["kind"] for s in snaps] == ["auto"] and snaps[0]["data_state"] == "OK"
    settle(a, cid)
    # a second good -> bad transition replaces the automatic snapshot (one per connection)
    a.call("mirror", con_id=cid, action="start", mode="full")
    until(
        lambda: (
            [s["id"] for s in b.call("snapshot_list", target=dst)] not in ([], [snaps[0]["id"]])
        ),
        "second automatic snapshot",
    )
    settle(a, cid)
    assert [s["kind"] for s in b.call("snapshot_list", target=dst)] == ["auto"]
    assert_same(src, dst)
    assert 4065 in [e["id"] for e in b.call("events")]


def test_manual_snapshot_revert_then_restore(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b, cid = setup_pair(tmp_path, service)
    snap = b.call("snapshot_take", target=dst)
    assert snap["kind"] == "manual" and snap["provider"] in ("copy", "btrfs")
    before = read(os.path.join(dst, "a.txt"))
    write(os.path.join(src, "a.txt"), "version 2 is longer")
    write(os.path.join(src, "new.txt"), "added later")
    settle(a, cid)
    assert_same(src, dst)
    r = b.call("snapshot_revert", target=dst, snapshot=snap["id"])
    assert r["data_state"] == "Snapshot Reverted"
    assert read(os.path.join(dst, "a.txt")) == before
    assert not os.path.exists(os.path.join(dst, "new.txt"))
    assert b.call("data_state", target=dst)[0]["data_state"] == "Snapshot Reverted"
    # the source learns it on reconnect and holds replication [L5621]
    until(
        lambda: a.call("status")["connections"][0]["target_data_state"] == "Snapshot Reverted",
        "source sees Snapshot Reverted",
    )
    write(os.path.join(src, "held.txt"), "not replicated while reverted")
    time.sleep(1.0)
    assert not os.path.exists(os.path.join(dst, "held.txt"))
    # restore: the target's (reverted) copy comes back to the source [L4674-4800]
    os.unlink(os.path.join(src, "held.txt"))
    res = a.call("restore", con_id=cid, orphans="delete")
    assert res["files"] >= 1
    assert read(os.path.join(src, "a.txt")) == before
    assert not os.path.exists(os.path.join(src, "new.txt"))  # orphan on the source
    assert_same(src, dst)
    st = until(
        lambda: (lambda s: s if s["target_data_state"] == "OK" else None)(
            a.call("status")["connections"][0]
        ),
        "OK after restore",
    )
    assert st["target_data_state"] == "OK"
    until(lambda: b.call("data_state", target=dst)[0]["data_state"] == "OK", "target OK")
    # replication runs again after the restore
    write(os.path.join(src, "after.txt"), "replicated again")
    settle(a, cid)
    assert_same(src, dst)
    ids = [e["id"] for e in a.call("events")]
    assert 4053 in ids and 4057 in ids


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_blocked_target_path(tmp_path: Any, service: Factory) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "f"), "one")
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    try:
        cid = connect(a, b, dst, mirror="full", block=True)
        settle(a, cid)
        assert b.call("blocked") == [dst]
        # another process cannot write the target path ...
        with pytest.raises(OSError) as exc:
            write(os.path.join(dst, "intruder"), "x")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError):
            os.unlink(os.path.join(dst, "f"))
        # ... while replication still updates it
        write(os.path.join(src, "f"), "two")
        write(os.path.join(src, "sub", "g"), "three")
        settle(a, cid)
        assert_same(src, dst)
        a.call("disconnect", con_id=cid)
        assert b.call("blocked") == []
        write(os.path.join(dst, "now-writable"), "ok")  # writable again after disconnect
        assert 4302 in [e["id"] for e in b.call("events")]
        assert 4304 in [e["id"] for e in b.call("events")]
    finally:
        # Clean up our mount by its exact path whatever happened.
        for _ in range(3):
            with open("/proc/self/mountinfo", encoding="utf-8") as fh:
                if not any(line.split()[4] == dst for line in fh):
                    break
            subprocess.run(["umount", dst], check=False)


@pytest.mark.parametrize("mode", ["delete", "move"])
def test_orphans_with_age_filter(tmp_path: Any, service: Factory, mode: str) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "keep"), "source file")
    old = time.time() - 7 * 86400
    write(os.path.join(dst, "old-orphan"), "old", mtime=old)
    write(os.path.join(dst, "olddir", "x"), "old too", mtime=old)
    os.utime(os.path.join(dst, "olddir"), (old, old))
    write(os.path.join(dst, "new-orphan"), "recent")
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    cid = connect(a, b, dst, mirror="differences", orphans=mode, orphans_age_s=86400)
    settle(a, cid)
    assert not os.path.exists(os.path.join(dst, "old-orphan"))
    assert not os.path.exists(os.path.join(dst, "olddir"))
    assert read(os.path.join(dst, "new-orphan")) == b"recent"  # younger than the age
    uuid = a.call("status")["connections"][0]["uuid"]
    moved = os.path.join(b.root, "state", "orphans", uuid)
    if mode == "move":
        assert read(os.path.join(moved, "old-orphan")) == b"old"
        assert read(os.path.join(moved, "olddir", "x")) == b"old too"
    else:
        assert not os.path.exists(moved)
    os.unlink(os.path.join(dst, "new-orphan"))
    assert_same(src, dst)
    ids = [e["id"] for e in a.call("events")]
    assert 4048 in ids and 4052 in ids


def test_verification_log_in_seed_format(tmp_path: Any, service: Factory) -> None:
    src, dst, a, _b, cid = setup_pair(tmp_path, service)
    r = a.call("verify", con_id=cid)
    assert r["different"] == 0
    # change the target behind the service's back; same size, older time
    p = os.path.join(dst, "a.txt")
    write(p, "VERSION 1", mtime=time.time() - 3600)
    r = a.call("verify", con_id=cid, remirror=True)
    assert [d["path"] for d in r["differences"]] == ["a.txt"]
    log_path = os.path.join(a.root, "state", "rs DTVerify.log")
    assert r["log"] == log_path
    with open(log_path, encoding="utf-8") as fh:
        text = fh.read()
    blocks = text.split("----- END OF VERIFICATION -----\n")
    assert len(blocks) == 3 and blocks[2] == ""  # appended, one block per run
    lines = blocks[1].splitlines()
    head = f"--- VERIFICATION OF CONNECTION {cid} (rs --> 127.0.0.1 : {_b.port}) ---"
    assert lines[0] == head
    assert lines[1].startswith("Start Time: ") and lines[1].endswith(
        f"for connection {cid} (rs --> 127.0.0.1 : {_b.port})"
    )
    assert lines[2].startswith("File:       ") and lines[2].endswith(
        "src/a.txt DIFFERENT ON TARGET"
    )
    assert lines[3].startswith("     Source Attributes: Timestamp = ")
    assert lines[3].endswith("Size = 9 Mask = [0x80]")
    assert lines[4].startswith("     Target Attributes: Timestamp = ")
    assert lines[5] == "      9 BYTES OUT OF SYNC"
    totals = dict(line.split(": ", 1) for line in lines if line.startswith("Total "))
    assert list(totals) == [
        "Total Directories Compared",
        "Total Directories Missing",
        "Total Directories Remirrored",
        "Total Files Compared",
        "Total Files Missing",
        "Total Files Different",
        "Total Files Encrypted",
        "Total Files Remirrored",
        "Total Bytes Skipped",
        "Total Bytes Compared",
        "Total Bytes Missing",
        "Total Bytes Different",
        "Total Bytes Remirrored",
    ]
    assert totals["Total Files Different"] == "1" and totals["Total Files Remirrored"] == "1"
    assert totals["Total Files Compared"] == "2"
    assert lines[-1] == "Related links and directory attributes have been adjusted."
    settle(a, cid)
    assert_same(src, dst)
    ids = [e["id"] for e in a.call("events")]
    assert 4058 in ids and 4062 in ids


def test_checksum_verification_finds_same_size_same_time_changes(
    tmp_path: Any, service: Factory
) -> None:
    """More files than one hash batch, in many directories; the planted changes keep
    size and mtime, so only the block hashes can see them."""
    src, dst, a, _b, cid = setup_pair(tmp_path, service)
    for i in range(700):
        write(os.path.join(src, f"m{i % 7}", f"f{i:04}"), os.urandom(100 + i))
    big = os.path.join(src, "big.bin")
    write(big, os.urandom(5 * 65536 + 17))
    settle(a, cid)
    assert_same(src, dst)
    assert a.call("verify", con_id=cid, checksum=True)["different"] == 0
    planted = ["m0/f0000", "m3/f0353", "m6/f0699"]
    for rel in [*planted, "big.bin"]:
        p = os.path.join(dst, rel)
        st = os.stat(p)
        with open(p, "r+b") as fh:
            fh.seek(st.st_size - 1 if rel != "big.bin" else 2 * 65536 + 5)
            fh.write(b"\x00" if read(p)[-1:] != b"\x00" else b"\x01")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = a.call("verify", con_id=cid)  # attributes alone see nothing
    assert r["different"] == 0
    r = a.call("verify", con_id=cid, checksum=True, remirror=True)
    assert sorted(d["path"] for d in r["differences"]) == sorted([*planted, "big.bin"])
    assert {d["reason"] for d in r["differences"]} == {"checksum differs"}
    assert r["files_checked"] == 702 + 1
    with open(r["log"], encoding="utf-8") as fh:
        last = fh.read().split("--- VERIFICATION OF CONNECTION")[-1]
    assert "      65536 BYTES OUT OF SYNC" in last  # one block of big.bin, not the file
    settle(a, cid)
    assert_same(src, dst)
    assert a.call("verify", con_id=cid, checksum=True)["different"] == 0


# ---------------------------------------------------------------------------- statistics
def dtstat(svc: ServiceProcess) -> dict[str, Any]:
    d: dict[str, Any] = svc.call("dtstat")
    return d


def test_statistics_last_file_compression_and_target_queue_move(
    tmp_path: Any, service: Factory
) -> None:
    src, dst, a, b, cid = setup_pair(tmp_path, service)
    write(os.path.join(src, "x", "new.txt"), "last one")
    settle(a, cid)
    d = dtstat(a)
    assert d["SOURCE"]["lastFileTouched"] == "x/new.txt"
    assert d["CONNECTION"][0]["lastFileTouched"] == "x/new.txt"
    assert d["CONNECTION"][0]["conBandwidthLimit"] == "Unlimited"
    before = d["CONNECTION"][0]
    assert before["conBytesCompressedTx"] == before["conBytesTx"]  # compression off
    a.call("compression", target="127.0.0.1", action="set", algorithm="zlib", level=6)
    write(os.path.join(src, "text.txt"), "all work and no play\n" * 20_000)
    settle(a, cid)
    after = dtstat(a)["CONNECTION"][0]
    raw = after["conBytesTx"] - before["conBytesTx"]
    wire = after["conBytesCompressedTx"] - before["conBytesCompressedTx"]
    assert raw > 400_000 and wire * 10 < raw, (raw, wire)
    # Target side: ops held while the target is paused are Ops Remaining.
    b.call("target", action="pause")
    for i in range(20):
        write(os.path.join(src, "held", f"f{i}"), os.urandom(1000))
    t = until(
        lambda: [x for x in dtstat(b)["TARGET"] if x["Ops Remaining"] > 0], "ops held on target"
    )[0]
    assert t["Bytes In Target Queue"] > 0
    b.call("target", action="resume")
    settle(a, cid)
    assert dtstat(b)["TARGET"][0]["Ops Remaining"] == 0
    assert_same(src, dst)


def test_failed_mirror_count_moves_when_the_target_refuses_a_file(
    tmp_path: Any, service: Factory
) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "ok.txt"), "fine")
    write(os.path.join(src, "locked.txt"), "new content")
    write(os.path.join(dst, "locked.txt"), "old content")
    for i in range(6):  # the mirror goes on after the refusal is acknowledged
        write(os.path.join(src, "zz", f"big{i}"), os.urandom(1 << 20))
    if subprocess.run(["chattr", "+i", os.path.join(dst, "locked.txt")]).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem")
    a, b = service("a"), service("b")
    try:
        a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
        assert dtstat(a)["KERNEL"]["FailedMirrorCount"] == 0
        cid = connect(a, b, dst, mirror="full")
        until(lambda: dtstat(a)["KERNEL"]["FailedMirrorCount"] >= 1, "a failed mirror op")
        # Visible: the copy is not good.
        until(
            lambda: a.call("status")["connections"][0]["target_data_state"] == "Mirror Required",
            "Mirror Required",
        )
    finally:
        subprocess.run(["chattr", "-i", os.path.join(dst, "locked.txt")], check=True)
    a.call("mirror", con_id=cid, action="start", mode="full")
    st = settle(a, cid)
    assert st["target_data_state"] == "OK"
    assert_same(src, dst)


# ---------------------------------------------------------------------------- restore
def test_restore_after_failover_changes_brings_the_copy_back_byte_for_byte(
    tmp_path: Any, service: Factory
) -> None:
    """The target served users after a failover (Restore Required holds replication);
    the restore copies the target's copy over the source: nested dirs, a multi-chunk
    file, a symlink, modes and times; source-only files moved away (orphans move)."""
    src, dst, a, b, cid = setup_pair(tmp_path, service)
    write(os.path.join(src, "keep", "same.txt"), "unchanged on both")
    settle(a, cid)
    b.call("data_state_set", target=dst, state="Restore Required", reason="failover")
    # The target now holds what the source sends [L5618]: its copy is the reference.
    assert b.call("data_state", target=dst)[0]["data_state"] == "Restore Required"
    # Users on the target after the failover:
    write(os.path.join(dst, "a.txt"), "written on the target after failover")
    write(os.path.join(dst, "deep", "er", "big.bin"), os.urandom(3 * (1 << 20) + 123))
    os.symlink("../a.txt", os.path.join(dst, "deep", "link"))
    os.chmod(os.path.join(dst, "deep", "er", "big.bin"), 0o640)
    os.utime(os.path.join(dst, "a.txt"), (1_700_000_000, 1_700_000_000))
    os.unlink(os.path.join(dst, "d", "b.bin"))
    # ... and a stale file on the failed source the target no longer has:
    write(os.path.join(src, "stale.tmp"), "only on the source")
    res = a.call("restore", con_id=cid, mode="differences", orphans="move")
    assert res["files"] == 2 and res["links"] == 1 and res["orphans"] >= 2
    assert res["changed_during"] == 0 and res["remirror"] is False
    assert_same(src, dst)  # byte for byte, with modes, owners and file times
    moved = os.path.join(a.root, "state", "orphans")
    found = [f for _r, _d, fs in os.walk(moved) for f in fs]
    assert "stale.tmp" in found and "b.bin" in found
    prog = a.call("status")["connections"][0]["restore"]
    assert prog["state"] == "done"
    assert (prog["files_done"], prog["bytes_done"]) == (prog["files_total"], prog["bytes_total"])
    until(lambda: b.call("data_state", target=dst)[0]["data_state"] == "OK", "target OK")
    write(os.path.join(src, "after.txt"), "replicated again")
    settle(a, cid)
    assert_same(src, dst)


def test_change_on_the_source_during_a_restore_is_mirrored_afterwards(
    tmp_path: Any, service: Factory
) -> None:
    import threading

    src, dst, a, b, cid = setup_pair(tmp_path, service)
    b.call("data_state_set", target=dst, state="Restore Required", reason="failover")
    # The target now holds what the source sends [L5618]: its copy is the reference.
    assert b.call("data_state", target=dst)[0]["data_state"] == "Restore Required"
    write(os.path.join(dst, "huge.bin"), os.urandom(48 << 20))  # 48 read requests
    seen: dict[str, Any] = {}

    def meddle() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            prog = a.call("status")["connections"][0].get("restore") or {}
            if prog.get("state") == "restoring" and 0 < prog["bytes_done"] < prog["bytes_total"]:
                write(os.path.join(src, "during", "new.txt"), "written while restoring")
                seen["state"] = a.call("status")["connections"][0]["restore"]["state"]
                return
            time.sleep(0.005)

    th = threading.Thread(target=meddle)
    th.start()
    res = a.call("restore", con_id=cid, orphans="off")
    th.join()
    if seen.get("state") not in ("restoring", "checking"):
        pytest.skip(f"the restore ended before the write could land in it ({seen})")
    # Never captured (capture is suspended during a restore): found by the check after
    # the restore, then sent by a difference mirror; the copy is OK only after it.
    assert res["changed_during"] >= 1 and res["remirror"] is True
    st = settle(a, cid)
    assert st["target_data_state"] == "OK"
    assert_same(src, dst)


def test_restore_from_an_empty_target_copy_is_refused(tmp_path: Any, service: Factory) -> None:
    src, dst, a, _b, cid = setup_pair(tmp_path, service)
    for name in os.listdir(dst):  # the copy vanished behind the service's back
        p = os.path.join(dst, name)
        subprocess.run(["rm", "-rf", p], check=True)
    before = os.listdir(src)
    with pytest.raises(Exception, match="lists nothing: restore refused"):
        a.call("restore", con_id=cid, orphans="delete")
    assert sorted(os.listdir(src)) == sorted(before)  # nothing deleted on the source
    st = a.call("status")["connections"][0]
    assert st["restore"]["state"] == "failed" and st["mirror_status"] == "Idle"
    assert 4056 in [e["id"] for e in a.call("events")]
    a.call("mirror", con_id=cid, action="start", mode="full")  # the way back
    settle(a, cid)
    assert_same(src, dst)


def test_auto_disconnect_and_reconnect_counters_move(tmp_path: Any, service: Factory) -> None:
    """Queue exhausted while the target is down: auto-disconnect, then auto-reconnect and
    auto-remirror when it is back; DTStat's SOURCE block counts both."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a.txt"), "x")
    a = service("a", start=False, queue={"memory_max_mb": 0.02, "disk_max_mb": 0.05})
    a.extra["queue"]["disk_folder"] = os.path.join(a.root, "state", "queue")
    a.start()
    b = service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    cid = connect(a, b, dst)
    settle(a, cid)
    s = dtstat(a)["SOURCE"]
    assert (s["autoDisConnects"], s["autoReConnects"]) == (0, 0)
    b.stop()
    for i in range(3000):
        write(os.path.join(src, f"d{i % 20:02}", f"file-with-a-long-name-{i:05}"), b"y" * 200)
    until(lambda: dtstat(a)["SOURCE"]["autoDisConnects"] == 1, "autoDisConnects 1", timeout=60)
    assert a.call("status")["connections"][0]["target_data_state"] == "Mirror Required"
    b.start()
    until(lambda: dtstat(a)["SOURCE"]["autoReConnects"] == 1, "autoReConnects 1", timeout=60)
    st = settle(a, cid)
    assert st["target_data_state"] == "OK"
    assert_same(src, dst)


def test_resent_ops_counted_after_the_target_froze_and_died(
    tmp_path: Any, service: Factory
) -> None:
    """Ops sent to a target that stops answering (SIGSTOP) and then dies (SIGKILL) are
    sent again from the unacknowledged window when it is back: conResentOpCount."""
    import json
    import signal

    src, dst, a, b, cid = setup_pair(tmp_path, service)
    write(os.path.join(src, "warm"), "x")
    settle(a, cid)
    # The target saves its applied position lazily (its saver thread): wait until the
    # saved one is the applied one, so after the kill it resumes from there (a resend)
    # instead of asking for a difference mirror.
    applied = b.call("status")["targets"][0]["last_seq"]

    def saved() -> int:
        with open(os.path.join(b.root, "state", "targets.json"), encoding="utf-8") as fh:
            return int(json.load(fh)[0]["last_seq"])

    until(lambda: saved() == applied, "target position saved")
    assert dtstat(a)["CONNECTION"][0]["conResentOpCount"] == 0
    assert b.proc is not None
    os.kill(b.proc.pid, signal.SIGSTOP)  # receives nothing more, acknowledges nothing
    try:
        for i in range(20):
            write(os.path.join(src, "burst", f"f{i}"), os.urandom(50_000))
        until(lambda: a.call("status")["connections"][0]["unacked_ops"] > 0, "unacked ops")
    finally:
        b.kill9()
    b.start()
    settle(a, cid)
    assert_same(src, dst)
    assert dtstat(a)["CONNECTION"][0]["conResentOpCount"] > 0

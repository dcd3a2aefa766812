"""Unit tests: data state table, snapshot retention/schedules, providers' command lines,
orphan age filter, verification log format. No services; clocks and runners scripted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from dtake.errors import DtakeError
from dtake.service import datastate as ds
from dtake.service.datastate import DataEvent
from dtake.service.orphans import select_by_age
from dtake.service.snapshot import (
    MIN_INTERVAL_S,
    BtrfsProvider,
    CopyProvider,
    LvmThinProvider,
    RunResult,
    Schedule,
    SnapshotRecord,
    SubprocessRunner,
    prune,
    revert_into,
)
from dtake.service.source import BLOCK
from dtake.service.verify import (
    Difference,
    FileAttrs,
    VerifyLog,
    VerifyReport,
    VerifySchedule,
    format_report,
    format_time,
    hash_blocks_fd,
)

# ---------------------------------------------------------------------------- data state
TABLE = [
    # (current, event, new, snapshot_before)   [L5602-5625]
    (ds.OK, DataEvent.MIRROR_STARTED, ds.MIRRORING, True),
    (ds.MIRROR_REQUIRED, DataEvent.MIRROR_STARTED, ds.MIRRORING, False),
    (ds.MIRRORING, DataEvent.MIRROR_STOPPED, ds.MIRROR_REQUIRED, False),
    (ds.MIRRORING, DataEvent.MIRROR_COMPLETE, ds.OK, False),
    # a write dropped during the mirror: its end does not make the copy good
    (ds.MIRROR_REQUIRED, DataEvent.MIRROR_COMPLETE, ds.MIRROR_REQUIRED, False),
    (ds.OK, DataEvent.WRITE_RETRIED, ds.OK, False),
    (ds.OK, DataEvent.WRITE_DROPPED, ds.MIRROR_REQUIRED, True),
    (ds.OK, DataEvent.WRITE_SUCCEEDED, ds.OK, False),
    (ds.OK, DataEvent.RESTARTED_WITH_PERSISTENCE, ds.OK, False),
    (ds.OK, DataEvent.RESTARTED_WITHOUT_PERSISTENCE, ds.MIRROR_REQUIRED, True),
    (ds.OK, DataEvent.OPS_LOST, ds.MIRROR_REQUIRED, True),
    (ds.OK, DataEvent.RESTORE_REQUIRED, ds.RESTORE_REQUIRED, True),
    (ds.OK, DataEvent.SNAPSHOT_REVERTED, ds.SNAPSHOT_REVERTED, False),
    (ds.RESTORE_REQUIRED, DataEvent.RESTORE_COMPLETE, ds.OK, False),
    (ds.SNAPSHOT_REVERTED, DataEvent.RESTORE_COMPLETE, ds.OK, False),
    (ds.SNAPSHOT_REVERTED, DataEvent.MIRROR_OVERRIDE, ds.MIRRORING, False),
    (ds.RESTORE_REQUIRED, DataEvent.MIRROR_OVERRIDE, ds.MIRRORING, False),
    (ds.OK, DataEvent.MIRROR_OVERRIDE, ds.MIRRORING, True),
]


@pytest.mark.parametrize(("cur", "ev", "new", "snap"), TABLE)
def test_state_table(cur: str, ev: DataEvent, new: str, snap: bool) -> None:
    tr = ds.transition(cur, ev)
    assert (tr.new, tr.snapshot_before) == (new, snap)
    assert not tr.held


@pytest.mark.parametrize(
    "ev",
    [
        DataEvent.MIRROR_STARTED,
        DataEvent.MIRROR_COMPLETE,
        DataEvent.WRITE_DROPPED,
        DataEvent.OPS_LOST,
        DataEvent.MIRROR_STOPPED,
    ],
)
@pytest.mark.parametrize("cur", [ds.RESTORE_REQUIRED, ds.SNAPSHOT_REVERTED])
def test_hold_states_only_leave_by_restore_or_user_mirror(cur: str, ev: DataEvent) -> None:
    tr = ds.transition(cur, ev)
    assert tr.new == cur and tr.held and not tr.snapshot_before


def test_restart_without_persistence_snapshots_only_with_auto_remirror() -> None:
    tr = ds.transition(ds.OK, DataEvent.RESTARTED_WITHOUT_PERSISTENCE, auto_remirror=False)
    assert tr.new == ds.MIRROR_REQUIRED and not tr.snapshot_before


def test_unknown_recorded_state_is_never_good() -> None:
    assert ds.transition("garbage", DataEvent.WRITE_SUCCEEDED).new == ds.MIRROR_REQUIRED
    assert ds.is_good(ds.OK) and not any(ds.is_good(s) for s in ds.BAD)
    assert ds.scheduled_allowed(ds.OK) and not ds.scheduled_allowed(ds.MIRRORING)


# ---------------------------------------------------------------------------- retention
def _rec(i: int, kind: str = "manual", path: str = "/t") -> SnapshotRecord:
    return SnapshotRecord(f"s{i:03}", path, kind, "copy", f"/x/{i}", float(i))


def test_prune_keeps_one_auto_and_at_most_max() -> None:
    recs = [_rec(i, "auto" if i % 10 == 0 else "manual") for i in range(100)]
    doomed = prune(recs, max_keep=64)
    kept = [r for r in recs if r not in doomed]
    assert len(kept) == 64
    assert [r.id for r in kept if r.kind == "auto"] == ["s090"]  # only the newest auto
    assert min(r.created for r in kept) > min(r.created for r in doomed)  # oldest pruned


def test_prune_nothing_when_under_limit() -> None:
    assert prune([_rec(1), _rec(2, "auto")], max_keep=64) == []


# ---------------------------------------------------------------------------- schedule
def test_schedule_interval_floor() -> None:
    with pytest.raises(DtakeError):
        Schedule(interval_s=MIN_INTERVAL_S - 1)


def test_schedule_due_delay_and_coalesce() -> None:
    s = Schedule(interval_s=900, next_due=1000)
    assert s.tick(999, True) is None
    assert s.tick(1000, True) == "take"
    assert s.next_due == 1900
    # bad state: the next one is delayed (4403 once) ...
    assert s.tick(1900, False) == "delay"
    assert s.tick(2000, False) is None
    # ... several due times pass while bad ...
    assert s.tick(5000, False) is None
    # ... and they coalesce into ONE snapshot when good again
    assert s.tick(5001, True) == "take"
    assert s.tick(5002, True) is None
    assert s.next_due > 5002 and (s.next_due - 1000) % 900 == 0


def test_schedule_missed_while_down_coalesce() -> None:
    s = Schedule(interval_s=900, next_due=0)
    assert s.tick(10 * 900 + 5, True) == "take"
    assert s.tick(10 * 900 + 6, True) is None
    assert s.next_due == 11 * 900


def test_schedule_disabled() -> None:
    s = Schedule(interval_s=900, next_due=0, enabled=False)
    assert s.tick(10_000, True) is None


# ---------------------------------------------------------------------------- providers
class Script:
    """Scripted runner: records argv, answers from a table of (prefix -> result)."""

    def __init__(self, answers: dict[str, RunResult] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.answers = answers or {}

    def __call__(self, argv: Sequence[str], *, timeout: float = 60.0) -> RunResult:
        self.calls.append(list(argv))
        for prefix, res in self.answers.items():
            if " ".join(argv).startswith(prefix):
                return res
        return RunResult(0)


def test_lvm_thin_command_lines(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    runner = Script({"lvs": RunResult(0, "  vg0|data|pool0\n")})
    p = LvmThinProvider(runner, str(tmp_path / "mnt"))
    monkeypatch.setattr(
        "dtake.service.snapshot._mount_of", lambda path: ("/srv", "/dev/mapper/vg0-data", "xfs")
    )
    rec = SnapshotRecord("20260101T000000-abc", "/srv/data/copy", "manual", "lvm", "", 1.0)
    assert p.supports("/srv/data/copy")
    p.create("/srv/data/copy", rec, timeout=60)
    assert [
        "lvcreate",
        "-s",
        "-n",
        "dtake_20260101T000000-abc",
        "--addtag",
        "dtake",
        "vg0/data",
    ] in runner.calls
    assert rec.location == "vg0/dtake_20260101T000000-abc" and rec.subpath == "data/copy"
    runner.calls.clear()
    with p.view(rec) as view:
        assert view.endswith("/data/copy")
    argv = [c[0] for c in runner.calls]
    assert argv == ["lvchange", "mount", "umount", "lvchange"]
    assert runner.calls[0] == ["lvchange", "-ay", "-K", "vg0/dtake_20260101T000000-abc"]
    assert runner.calls[1][1:3] == ["-o", "ro,nouuid"]  # xfs: the snapshot shares the UUID
    runner.calls.clear()
    p.delete(rec)
    assert runner.calls == [["lvremove", "-f", "vg0/dtake_20260101T000000-abc"]]


def test_lvm_not_thin_is_not_supported(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    runner = Script({"lvs": RunResult(0, "  vg0|plain|\n")})
    monkeypatch.setattr("dtake.service.snapshot._mount_of", lambda path: ("/", "/dev/sda1", "ext4"))
    assert not LvmThinProvider(runner, str(tmp_path)).supports("/srv")


def test_btrfs_command_lines(tmp_path: Any) -> None:
    runner = Script()
    tp = tmp_path / "vol"
    tp.mkdir()
    p = BtrfsProvider(runner)
    rec = SnapshotRecord("s1", str(tp), "manual", "btrfs", "", 1.0)
    snapdir = tmp_path / ".dtake-snapshots" / "vol"
    snapdir.mkdir(parents=True)
    (snapdir / ".s1.tmp").mkdir()  # what `btrfs subvolume snapshot` would create
    p.create(str(tp), rec, timeout=60)
    assert runner.calls == [
        ["btrfs", "subvolume", "snapshot", "-r", str(tp), str(snapdir / ".s1.tmp")]
    ]
    assert rec.location == str(snapdir / "s1") and os.path.isdir(rec.location)
    runner.calls.clear()
    p.delete(rec)
    assert runner.calls == [["btrfs", "subvolume", "delete", str(snapdir / "s1")]]


def _fill(root: str, content: dict[str, str]) -> None:
    for rel, data in content.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as fh:
            fh.write(data)


def _read(root: str) -> dict[str, str]:
    out = {}
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p) as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_copy_provider_snapshot_and_revert(tmp_path: Any) -> None:
    root = str(tmp_path / "copy")
    os.makedirs(root)
    _fill(root, {"a": "one", "d/b": "two", ".hidden": "h"})
    # a transfer in flight at snapshot time is not part of the snapshot
    _fill(root, {".x.dtake-0123456789abcdef": "partial"})
    runner = SubprocessRunner()
    p = CopyProvider(runner, str(tmp_path / "snaps"))
    rec = SnapshotRecord("s1", root, "manual", "copy", "", 1.0)
    p.create(root, rec, timeout=60)
    assert _read(rec.location) == {"a": "one", "d/b": "two", ".hidden": "h"}
    os.unlink(os.path.join(root, ".x.dtake-0123456789abcdef"))
    _fill(root, {"a": "changed", "new": "n"})
    shutil.rmtree(os.path.join(root, "d"))
    with p.view(rec) as view:
        revert_into(runner, view, root, timeout=60)
    assert _read(root) == {"a": "one", "d/b": "two", ".hidden": "h"}
    assert not [n for n in os.listdir(root) if "dtake-" in n]  # staging and trash gone
    p.delete(rec)
    assert not os.path.exists(rec.location)


# ---------------------------------------------------------------------------- orphans
def test_orphan_age_filter() -> None:
    now = 1_000_000.0
    ents = [
        ("old", "f", 1, int((now - 7200) * 1e9)),
        ("new", "f", 1, int((now - 60) * 1e9)),
        ("edge", "f", 1, int((now - 3600) * 1e9) + 1),
    ]
    kept, skipped = select_by_age(ents, age_s=3600, now=now)
    assert [e[0] for e in kept] == ["old"] and skipped == 2
    kept, skipped = select_by_age(ents, age_s=0, now=now)
    assert len(kept) == 3 and skipped == 0


# ---------------------------------------------------------------------------- verification
@pytest.fixture
def utc() -> Iterator[None]:
    import time as _t

    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    _t.tzset()
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    _t.tzset()


def test_time_format_has_no_leading_zeros(utc: None) -> None:
    assert format_time(1264335320) == "1/24/2010 12:15:20 PM"
    assert format_time(1263759696) == "1/17/2010 8:21:36 PM"
    assert format_time(1263686400) == "1/17/2010 12:00:00 AM"


SEED_SAMPLE = """\
--- VERIFICATION OF CONNECTION 2 (Sales data for alpha --> 206.31.65.40 : 1100) ---
Start Time: 1/24/2010 12:15:20 PM for connection 2 (Sales data for alpha --> 206.31.65.40 : 1100)
File:       beta/users/bob/budget.xls DIFFERENT ON TARGET
     Source Attributes: Timestamp = 1/17/2010 8:21:36 PM Size = 1272 Mask = [0x20]
     Target Attributes: Timestamp = 1/17/2010 8:21:36 PM Size = 1272 Mask = [0x20]
Security descriptors are different.
      0 BYTES OUT OF SYNC
File:       beta/users/vincent/training.doc DIFFERENT ON TARGET
     Source Attributes: Timestamp = 1/12/2010 3:28:20 PM Size = 17 Mask = [0x20]
     Target Attributes: Timestamp = 1/20/2010 5:05:26 PM Size = 2 Mask = [0x20]
      17 BYTES OUT OF SYNC
Completion Time: 1/24/2010 12:37:44 PM for connection 2 (Sales data for alpha --> 206.31.65.40 : 1100)
Elapsed Time (seconds): 1344.000000
Total Directories Compared: 657
Total Directories Missing: 0
Total Directories Remirrored: 0
Total Files Compared: 120978
Total Files Missing: 0
Total Files Different: 2
Total Files Encrypted: 0
Total Files Remirrored: 1
Total Bytes Skipped: 0
Total Bytes Compared: 18527203678
Total Bytes Missing: 0
Total Bytes Different: 17
Total Bytes Remirrored: 17
Related links and directory attributes have been adjusted.
----- END OF VERIFICATION -----
"""


def test_verification_log_matches_seed_sample(utc: None) -> None:
    r = VerifyReport(2, "Sales data for alpha", "206.31.65.40", 1100, start=1264335320)
    r.end = 1264335320 + 1344
    a = FileAttrs(1263759696, 1272, 0x20)
    r.differences = [
        Difference("beta/users/bob/budget.xls", "x", "owner differs", a, a, True, 0),
        Difference(
            "beta/users/vincent/training.doc",
            "y",
            "size differs",
            FileAttrs(1263310100, 17, 0x20),
            FileAttrs(1264007126, 2, 0x20),
            False,
            17,
        ),
    ]
    r.dirs_compared, r.files_compared, r.files_different = 657, 120978, 2
    r.files_remirrored, r.bytes_compared, r.bytes_different, r.bytes_remirrored = (
        1,
        18527203678,
        17,
        17,
    )
    assert format_report(r) == SEED_SAMPLE


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def test_verify_log_append_overwrite_and_max(tmp_path: Any) -> None:
    vl = VerifyLog(folder=str(tmp_path), max_bytes=1048576)
    p = vl.write("UserData", "one\n")
    assert os.path.basename(p) == "UserData DTVerify.log"
    vl.write("UserData", "two\n")
    assert _text(p) == "one\ntwo\n"
    VerifyLog(folder=str(tmp_path), append=False).write("UserData", "three\n")
    assert _text(p) == "three\n"
    small = VerifyLog(folder=str(tmp_path), filename="small.log", max_bytes=10)
    small.write("rs", "12345\n")
    small.write("rs", "abcdef\n")  # would pass the limit: logging stops
    assert _text(small.path_for("rs")) == "12345\n"


def test_verify_schedule_interval_and_once() -> None:
    s = VerifySchedule(next_due=100, interval_s=60)
    assert not s.due(99) and s.due(100) and s.next_due == 160
    assert s.due(400) and s.next_due == 460  # missed runs coalesce
    once = VerifySchedule(next_due=10)
    assert once.due(10) and not once.enabled and not once.due(1000)


# ---------------------------------------------------------------------------- btrfs, real
def _have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


@pytest.mark.skipif(
    os.geteuid() != 0 or not _have("mkfs.btrfs") or not _have("losetup"),
    reason="needs root, mkfs.btrfs and losetup (btrfs-progs)",
)
def test_btrfs_provider_real_loop(tmp_path: Any) -> None:
    img = str(tmp_path / "btrfs.img")
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    with open(img, "wb") as fh:
        fh.truncate(128 * 1024 * 1024)
    subprocess.run(["mkfs.btrfs", "-q", img], check=True, capture_output=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", img], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert re.fullmatch(r"/dev/loop\d+", loop)
    mounted = False
    try:
        subprocess.run(["mount", loop, mnt], check=True, capture_output=True)
        mounted = True
        vol = os.path.join(mnt, "copy")
        subprocess.run(["btrfs", "subvolume", "create", vol], check=True, capture_output=True)
        _fill(vol, {"a": "one", "d/b": "two"})
        runner = SubprocessRunner()
        p = BtrfsProvider(runner)
        assert p.supports(vol) and not p.supports(os.path.join(vol, "d"))
        rec = SnapshotRecord("s1", vol, "manual", "btrfs", "", 1.0)
        p.create(vol, rec, timeout=60)
        _fill(vol, {"a": "changed", "c": "new"})
        with p.view(rec) as view:
            assert _read(view) == {"a": "one", "d/b": "two"}
            revert_into(runner, view, vol, timeout=60)
        assert _read(vol) == {"a": "one", "d/b": "two"}
        p.delete(rec)
        assert not os.path.exists(rec.location)
    finally:
        if mounted:
            subprocess.run(["umount", mnt], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


# ---------------------------------------------------------------------------- event log
def test_event_texts_and_log_series_rotation(tmp_path: Any) -> None:
    from dtake.service.events import EventLog

    path = str(tmp_path / "dtake.log")
    ev = EventLog(path)
    ev.max_file_bytes, ev.max_files = 600, 3
    rec = ev.emit(4058, target="10.0.0.2:6320", repset="rs", con_id=1)
    assert rec["message"] == (
        "Service has started a verification task to 10.0.0.2:6320 (10.0.0.2) for "
        "Replication Set rs, ID: 1"
    )
    assert (
        ev.emit(4302, path="/data")["message"] == "Target Path /data has been successfully blocked"
    )
    for i in range(40):
        ev.emit(4065, con_id=i, source="a", source_ip="a", reason="Mirror Started")
    names = sorted(os.listdir(tmp_path))
    assert "dtake.log" in names
    rotated = [n for n in names if n.startswith("dtake.log.")]
    assert 1 <= len(rotated) <= 2  # max_files counts the current file too
    assert os.path.getsize(path) < 600 + 400


# ---------------------------------------------------------------------------- verify hashing
@pytest.mark.parametrize(
    "size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 16 * BLOCK, 33 * BLOCK + 7]
)
def test_verify_block_hashes_equal_the_targets_function(tmp_path: Any, size: int) -> None:
    from dtake.service.apply import block_hashes_fd

    p = tmp_path / "f"
    p.write_bytes(os.urandom(size))
    fd = os.open(p, os.O_RDONLY)
    try:
        assert hash_blocks_fd(fd, size) == block_hashes_fd(fd, BLOCK)
        os.lseek(fd, 0, os.SEEK_SET)
        assert len(hash_blocks_fd(fd, size)) == -(-size // BLOCK)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- statistics
class _FakeSvc:
    started = 0.0

    def __init__(self, status: dict[str, Any]) -> None:
        self._status = status
        self.features: dict[str, Any] = {}

    def status(self) -> dict[str, Any]:
        return self._status


def _conn(cid: int, ops: int, last: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "repset": "rs",
        "target": "10.0.0.2:6320",
        "state": "Started",
        "connected_since": 0,
        "unacked_ops": 0,
        "queued_items": 0,
        "queued_bytes": 0,
        "mirror_status": "Idle",
        "target_data_state": "OK",
        "replication_status": "Ready",
        "queue": {"disk_bytes": 4096},
        "target_queue": {"ops": 3, "bytes": 10},
        "auto_disconnects": 1,
        "auto_reconnects": 2,
        "bytes_sent_uncompressed": 1000,
        "bytes_sent_compressed": 250,
        "bandwidth_limit_kbps": 512.0,
        "stats": {
            "ops_sent": ops,
            "resent_ops": 7,
            "mirror_failures": 2,
            "read_failures": 5,
            "last_file_touched": last,
        },
        **extra,
    }


def test_statistics_read_the_real_counters_and_omit_what_linux_lacks() -> None:
    from dtake.service.metrics import collect, exposition, render_dtstat

    target = {"source_node": "alpha", "target_path": "/copy", "retries": 4, "failures": 1}
    target["target_queue"] = {"ops": 9, "bytes": 900}
    svc = _FakeSvc({"node": "n", "connections": [_conn(1, 10, "a/x")], "targets": [target]})
    d = collect(svc)  # type: ignore[arg-type]
    k, s, c, t = d["KERNEL"], d["SOURCE"], d["CONNECTION"][0], d["TARGET"][0]
    assert (k["FailedMirrorCount"], k["FailedRepCount"]) == (2, 3)
    assert (s["autoDisConnects"], s["autoReConnects"], s["lastFileTouched"]) == (1, 2, "a/x")
    assert (c["conResentOpCount"], c["conBytesTx"], c["conBytesCompressedTx"]) == (7, 1000, 250)
    assert (c["conBytesInDiskQueue"], c["conOpsInCmdQueue"]) == (4096, 3)
    assert c["conBandwidthLimit"] == "512 kbps"
    assert (t["Retries"], t["OpsDropped"], t["Ops Remaining"], t["Bytes In Target Queue"]) == (
        4,
        1,
        9,
        900,
    )
    text = render_dtstat(d)
    for absent in ("Tasks", "ActFailCount", "DriverQueuePercent", "ALLOCATOR", "conOpsInMirQueue"):
        assert absent not in text  # no Linux meaning: left out, not a made-up 0
    assert "conResentOpCount: 7" in text and "lastFileTouched : a/x" in text
    prom = exposition(svc)  # type: ignore[arg-type]
    assert 'dtake_con_resent_ops_total{id="1",repset="rs",target="10.0.0.2:6320"} 7' in prom
    assert "dtake_failed_mirror_total 2" in prom


def test_statistics_count_the_paths_sent_again_after_a_rename() -> None:
    # Connection.stats vanished_resent / replaced_resent, as the neighbouring counters.
    from dtake.service.metrics import collect, exposition, render_dtstat

    conn = _conn(1, 10, "a/x")
    conn["stats"].update(vanished_resent=3, replaced_resent=4, relinked_sent=5)
    svc = _FakeSvc({"node": "n", "connections": [conn], "targets": []})
    d = collect(svc)  # type: ignore[arg-type]
    c = d["CONNECTION"][0]
    assert (c["conVanishedResentCount"], c["conReplacedResentCount"]) == (3, 4)
    assert c["conRelinkedSentCount"] == 5
    assert "conVanishedResentCount: 3 conReplacedResentCount: 4 conRelinkedSentCount: 5" in (
        render_dtstat(d)
    )
    prom = exposition(svc)  # type: ignore[arg-type]
    labels = '{id="1",repset="rs",target="10.0.0.2:6320"}'
    for name, value in (("vanished_resent", 3), ("replaced_resent", 4), ("relinked_sent", 5)):
        assert f"# TYPE dtake_con_{name}_total counter" in prom
        assert f"dtake_con_{name}_total{labels} {value}" in prom


def test_last_file_touched_follows_the_connection_that_sent_last() -> None:
    from dtake.service.metrics import collect

    conns = [_conn(1, 10, "one/a"), _conn(2, 5, "two/b")]
    svc = _FakeSvc({"node": "n", "connections": conns, "targets": []})
    collect(svc)  # type: ignore[arg-type]
    conns[0] = _conn(1, 11, "one/c")  # only connection 1 sent since
    assert collect(svc)["SOURCE"]["lastFileTouched"] == "one/c"  # type: ignore[arg-type]
    conns[1] = _conn(2, 6, "two/d")
    assert collect(svc)["SOURCE"]["lastFileTouched"] == "two/d"  # type: ignore[arg-type]

"""Queues, connection recovery and transmission control with real services on loopback.

Each test ends with a byte-for-byte tree comparison, or asserts the visible state that
says the trees are not identical. Waits are bounded; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from dtake.testing import ServiceProcess, tree_diff
from tests.service_support import assert_same, settle

Factory = Callable[..., ServiceProcess]


def connect(src: ServiceProcess, dst: ServiceProcess, target: str, **kw: Any) -> int:
    r = src.call("connect", repset="rs", host="127.0.0.1", port=dst.port, target_path=target, **kw)
    return int(r["id"])


def conn_status(svc: ServiceProcess, cid: int) -> dict[str, Any]:
    for c in svc.call("status")["connections"]:
        if c["id"] == cid:
            return dict(c)
    raise AssertionError(f"no connection {cid}")


def wait_for(pred: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def event_ids(svc: ServiceProcess) -> list[int]:
    return [int(e["id"]) for e in svc.call("events", limit=5000)]


def burst(root: str, n: int, *, seed: int = 3, size: int = 200) -> None:
    rnd = random.Random(seed)
    for i in range(n):
        d = os.path.join(root, f"d{i % 20:02}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"file-with-a-long-name-{i:05}"), "wb") as fh:
            fh.write(rnd.randbytes(size))


def small_queue(**extra: Any) -> dict[str, Any]:
    return {"queue": {"memory_max_mb": 0.02, **extra}}  # ~20 KB: a few hundred items


def start_pair(
    tmp_path: Any, service: Factory, *, src_extra: dict[str, Any] | None = None
) -> tuple[ServiceProcess, ServiceProcess, str, str, int]:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    burst(src, 50)
    a = service("a", start=False, **(src_extra or {}))
    if "queue" in a.extra:  # a queue section replaces the default one: keep its folder
        a.extra["queue"]["disk_folder"] = os.path.join(a.root, "state", "queue")
    a.start()
    b = service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    cid = connect(a, b, dst)
    settle(a, cid)
    assert_same(src, dst)
    return a, b, src, dst, cid


def test_target_down_queue_spills_to_disk_then_drains(tmp_path: Any, service: Factory) -> None:
    a, b, src, dst, cid = start_pair(tmp_path, service, src_extra=small_queue())
    b.stop()
    burst(src, 3000, seed=9)
    for i in range(0, 50, 5):  # deletes and renames of files the target already has
        p = os.path.join(src, f"d{i % 20:02}", f"file-with-a-long-name-{i:05}")
        if i % 10:
            os.unlink(p)
        else:
            os.rename(p, p + ".renamed")
    wait_for(lambda: conn_status(a, cid)["queue"]["disk_items"] > 1000, what="disk spill")
    st = conn_status(a, cid)
    assert st["queue"]["memory_bytes"] <= st["queue"]["memory_max_bytes"]
    logs = os.listdir(os.path.join(a.root, "state", "queue"))
    assert any(n.startswith(f"127.0.0.1_{b.port}_{cid}_") and n.endswith(".dtq") for n in logs)
    b.start()
    settle(a, cid)
    assert_same(src, dst)
    st = conn_status(a, cid)
    assert st["queue"]["spilled_items"] > 1000 and st["queue"]["disk_items"] == 0
    assert st["auto_disconnects"] == 0  # never exhausted: nothing was remirrored
    assert st["stats"]["remirrors"] == 0


def test_queue_exhausted_auto_disconnect_then_auto_remirror(
    tmp_path: Any, service: Factory
) -> None:
    a, b, src, dst, cid = start_pair(tmp_path, service, src_extra=small_queue(disk_max_mb=0.05))
    b.stop()
    burst(src, 3000, seed=11)
    wait_for(lambda: 4007 in event_ids(a), what="auto-disconnect event 4007")
    ids = event_ids(a)
    assert {78, 4007, 85, 801, 4008} <= set(ids)
    st = conn_status(a, cid)
    # Visible: the target is not a good copy, and replication waits for a remirror.
    assert st["target_data_state"] == "Mirror Required"
    assert st["replication_status"] == "Pending"
    assert st["recovery"] == "reconnecting" and st["auto_disconnects"] == 1
    assert st["queue"]["disk_bytes"] == 0  # discarded
    b.start()
    settle(a, cid)
    assert_same(src, dst)
    st = conn_status(a, cid)
    assert st["recovery"] == "normal" and st["auto_reconnects"] == 1
    assert {4009, 4010} <= set(event_ids(a))


def test_queue_exhausted_without_auto_remirror_stays_pending(
    tmp_path: Any, service: Factory
) -> None:
    a, b, src, dst, cid = start_pair(
        tmp_path, service, src_extra={**small_queue(disk_max_mb=0.05), "auto_remirror": False}
    )
    b.stop()
    burst(src, 3000, seed=12)
    wait_for(lambda: 4007 in event_ids(a), what="auto-disconnect")
    b.start()
    wait_for(lambda: 4010 in event_ids(a), what="auto-reconnect")
    time.sleep(1.0)
    st = conn_status(a, cid)
    assert st["replication_status"] == "Pending"  # [L5047]: until a mirror is started
    assert st["target_data_state"] == "Mirror Required"
    assert st["recovery"] == "pending"
    assert tree_diff(src, dst) != []  # and it is not: the state says so
    a.call("mirror", con_id=cid, action="start", mode="differences")
    settle(a, cid)
    assert_same(src, dst)
    assert conn_status(a, cid)["replication_status"] in ("Ready", "Replicating")


def test_kill9_source_with_disk_queue_replays_after_restart(
    tmp_path: Any, service: Factory
) -> None:
    a, b, src, dst, cid = start_pair(tmp_path, service, src_extra=small_queue())
    b.stop()
    burst(src, 1500, seed=21)
    removed = []
    for i in range(0, 50, 3):  # deletes only a replayed queue can bring to the target
        p = os.path.join(src, f"d{i % 20:02}", f"file-with-a-long-name-{i:05}")
        os.unlink(p)
        removed.append(os.path.relpath(p, src))
    os.rename(os.path.join(src, "d01"), os.path.join(src, "d01-moved"))
    wait_for(lambda: conn_status(a, cid)["queue"]["disk_items"] > 500, what="disk spill")
    time.sleep(0.5)
    a.kill9()
    b.start()
    a.start()
    settle(a, cid)
    st = conn_status(a, cid)
    assert st["queue"]["reloaded_items"] > 500  # the logs were trusted and replayed
    assert_same(src, dst)  # incl. the deletes: a difference mirror alone keeps them
    for rel in removed:
        assert not os.path.exists(os.path.join(dst, rel))


def test_transmit_stop_closes_socket_pause_keeps_it(tmp_path: Any, service: Factory) -> None:
    a, b, src, dst, cid = start_pair(tmp_path, service)
    a.call("transmit", con_id=cid, action="pause")
    wait_for(lambda: conn_status(a, cid)["state"] == "Paused", what="Paused")
    st = conn_status(a, cid)
    assert st["connected_since"] is not None  # the socket is kept [L3000]
    burst(src, 200, seed=31)
    wait_for(lambda: conn_status(a, cid)["queued_items"] > 0, what="queueing while paused")
    time.sleep(0.5)
    assert not os.path.exists(os.path.join(dst, "d00", "file-with-a-long-name-00180"))
    a.call("transmit", con_id=cid, action="resume")
    settle(a, cid)
    assert_same(src, dst)

    a.call("transmit", con_id=cid, action="stop")
    wait_for(lambda: conn_status(a, cid)["connected_since"] is None, what="socket closed")
    assert conn_status(a, cid)["state"] == "Stopped"
    wait_for(
        lambda: b.call("target", action="status")["connections"] == [],
        what="the target sees the session end",
    )
    burst(src, 200, seed=32)
    wait_for(lambda: conn_status(a, cid)["queued_items"] > 0, what="queueing while stopped")
    a.call("transmit", con_id=cid, action="start")
    settle(a, cid)
    assert_same(src, dst)
    ids = event_ids(a)
    assert 4014 in ids and 4015 in ids


def test_target_pause_queues_on_target_then_resume_drains(tmp_path: Any, service: Factory) -> None:
    a, b, src, dst, cid = start_pair(tmp_path, service)
    r = b.call("target", action="pause")
    assert r["status"] in ("Pause Pending", "Paused")
    wait_for(lambda: b.call("target", action="status")["status"] == "Paused", what="Paused")
    burst(src, 300, seed=41)
    wait_for(lambda: b.call("target", action="status")["queue_ops"] > 0, what="target queue grows")
    wait_for(
        lambda: conn_status(a, cid)["target_queue"]["ops"] > 0,
        what="source sees the target queue",
    )
    assert conn_status(a, cid)["target_status"] == "Paused"
    tq = [t for t in b.call("status")["targets"] if t["connected"]]
    assert tq and tq[0]["target_queue"]["ops"] > 0 and tq[0]["target_status"] == "Paused"
    assert tree_diff(src, dst) != []  # paused: nothing written
    b.call("target", action="resume")
    settle(a, cid)
    assert_same(src, dst)
    assert b.call("target", action="status")["queue_ops"] == 0
    assert {4026, 4027} <= set(event_ids(b))


def test_bandwidth_limit_slows_transfer_by_its_own_accounting(
    tmp_path: Any, service: Factory
) -> None:
    a, _b, src, dst, cid = start_pair(tmp_path, service)
    r = a.call("bandwidth", target="127.0.0.1", action="fixed", kbps=4000)
    assert r["bandwidth"]["mode"] == "fixed"
    wait_for(
        lambda: a.call("bandwidth", target="127.0.0.1")["limiter"]["limit_kbps"] == 4000,
        what="limit in force",
    )
    rnd = random.Random(5)
    with open(os.path.join(src, "big.bin"), "wb") as fh:
        fh.write(rnd.randbytes(2 * 1024 * 1024))  # incompressible
    settle(a, cid)
    assert_same(src, dst)
    lim = a.call("bandwidth", target="127.0.0.1")["limiter"]
    assert lim["bytes_limited"] >= 2 * 1024 * 1024
    # 2 MiB at 500 kB/s must have waited ~4 s minus the 0.25 s burst allowance.
    rate = 4000 * 1000 / 8
    assert lim["waited_s"] >= (lim["bytes_limited"] / rate - 0.25) * 0.9
    assert 4063 in event_ids(a)
    a.call("bandwidth", target="127.0.0.1", action="none")


def test_compression_changes_on_a_live_connection(tmp_path: Any, service: Factory) -> None:
    a, _b, src, dst, cid = start_pair(tmp_path, service)
    r = a.call("compression", target="127.0.0.1", action="set", algorithm="zlib", level=6)
    assert r["compression"] == ["zlib", 6]
    assert conn_status(a, cid)["compression"] == "zlib"
    before = conn_status(a, cid)
    with open(os.path.join(src, "text.txt"), "w") as fh:
        fh.write("all work and no play makes jack a dull boy\n" * 50_000)
    settle(a, cid)
    assert_same(src, dst)
    after = conn_status(a, cid)
    raw = after["bytes_sent_uncompressed"] - before["bytes_sent_uncompressed"]
    wire = after["bytes_sent_compressed"] - before["bytes_sent_compressed"]
    assert raw > 2_000_000 and wire * 10 < raw, (raw, wire)


def test_write_burst_keeps_accounted_memory_within_the_limit(
    tmp_path: Any, service: Factory
) -> None:
    """Issue 5: queued items plus the in-flight window stay within QMemoryBufferMax.
    The target is paused, so unacknowledged ops pile up in flight while the burst
    queues behind them (the in-flight window used to be 64 MiB, uncounted)."""
    limit_mb = 1
    a, b, src, dst, cid = start_pair(
        tmp_path, service, src_extra={"queue": {"memory_max_mb": limit_mb}}
    )
    b.call("target", action="pause")
    wait_for(lambda: b.call("target", action="status")["status"] == "Paused", what="Paused")
    burst(src, 400, seed=51, size=48 * 1024)  # ~19 MB of data, 19x the limit
    peak = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = conn_status(a, cid)
        q = st["queue"]
        assert q["memory_max_bytes"] == limit_mb * 1024 * 1024
        assert q["accounted_bytes"] <= q["memory_max_bytes"], q
        assert q["accounted_bytes"] == q["memory_bytes"] + q["inflight_bytes"]
        peak = max(peak, q["accounted_peak_bytes"])
        if q["inflight_bytes"] > 0 and st["queued_items"] >= 380:
            break  # the window is full and the rest of the burst waits in the queue
        time.sleep(0.05)
    q = conn_status(a, cid)["queue"]
    assert q["inflight_bytes"] > 0, "nothing in flight: the test did not exercise the window"
    assert q["accounted_peak_bytes"] <= q["memory_max_bytes"], q
    b.call("target", action="resume")
    settle(a, cid)
    assert_same(src, dst)
    q = conn_status(a, cid)["queue"]
    assert max(peak, q["accounted_peak_bytes"]) <= q["memory_max_bytes"]


def test_kill9_source_mid_mirror_walk_replays_the_walked_items(
    tmp_path: Any, service: Factory
) -> None:
    """The mirror walk queues a directory's entries with one log write per slice
    (put_lazy_many): what it queued before a kill -9 is in the logs and is replayed."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    burst(src, 3000, seed=5)
    a = service("a", start=False, **small_queue(memory_max_mb=1))
    a.extra["queue"]["disk_folder"] = os.path.join(a.root, "state", "queue")
    a.start()
    b = service("b")
    b.stop()  # the walk queues for a target that is down, up to half the memory
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    cid = connect(a, b, dst, mirror="full")
    # (a directory's small files are one FILES item: 20 of them, 20 MKDIRs, 21 ATTRS)
    wait_for(lambda: conn_status(a, cid)["queue"]["memory_items"] > 40, what="walk queued")
    a.kill9()
    b.start()
    a.start()
    settle(a, cid)
    assert conn_status(a, cid)["queue"]["reloaded_items"] > 40  # trusted and replayed
    assert_same(src, dst)

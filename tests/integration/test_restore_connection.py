"""Restoration connections end to end [L4674-4800, L346-350]: real services on loopback.

``a`` is the original source, ``b`` its target. After a "failover" (the source is down,
the users write on the target, the agent sets Restore Required on the target's copy) the
target opens a restoration connection ``(rs_Restore)`` to the source. Every test ends
with a byte-for-byte tree comparison. Waits are bounded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from dtake.errors import DtakeError
from dtake.testing import ServiceProcess
from tests.service_support import assert_same, settle, sh, until

Factory = Callable[..., ServiceProcess]


def write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def conn(svc: ServiceProcess, cid: int) -> dict[str, Any]:
    c: dict[str, Any] = next(c for c in svc.call("status")["connections"] if c["id"] == cid)
    return c


def copy_state(svc: ServiceProcess, path: str, uuid: str) -> dict[str, Any]:
    return next(x for x in svc.call("data_state", target=path) if x["uuid"] == uuid)


def failed_over_pair(tmp_path: Any, service: Factory) -> tuple[str, str, Any, Any, int, str]:
    """Source a replicates rs to b; then a is down, loses data, and the users changed
    b's copy (failover): b's copy is Restore Required; a restarts and holds."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "a.txt"), "version 1")
    write(os.path.join(src, "d", "b.bin"), os.urandom(300_000))
    write(os.path.join(src, "d", "e", "c.txt"), "deep")
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec", f"{src}/tmp exc, rec"])
    r = a.call(
        "connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst, orphans="delete"
    )
    cid = int(r["id"])
    settle(a, cid)
    assert_same(src, dst)
    uuid = str(r["uuid"])
    a.kill9()  # the source fails
    b.call("data_state_set", target=dst, state="Restore Required", reason="failover")
    os.unlink(os.path.join(src, "d", "b.bin"))  # lost on the source
    write(os.path.join(src, "a.txt"), "stale on the source")
    write(os.path.join(src, "only-on-source.txt"), "an orphan")
    write(os.path.join(dst, "new-on-target.txt"), "written by users after failover")
    write(os.path.join(dst, "d", "e", "c.txt"), "changed on the target")
    a.start()
    # the source learns Restore Required from the target and sends nothing [L5623]
    until(lambda: conn(a, cid)["target_data_state"] == "Restore Required", "source holds")
    return src, dst, a, b, cid, uuid


def restore_connect(b: ServiceProcess, a: ServiceProcess, **kw: Any) -> int:
    kw.setdefault("orphans", "delete")
    r = b.call("restore_connect", source=f"127.0.0.1:{a.port}", repset="rs", **kw)
    assert r["repset"] == "(rs_Restore)" and r["restore_to"].endswith("/src")
    return int(r["id"])


def end_restore(a: Any, b: Any, cid: int, rid: int, src: str, dst: str) -> dict[str, Any]:
    """Disconnect the restoration connection: the original connection is Mirror
    Required [L4799], its automatic mirror makes it OK, and the trees are equal."""
    b.call("disconnect", con_id=rid)
    until(lambda: conn(a, cid)["target_data_state"] == "OK", "original connection OK", timeout=60)
    st = settle(a, cid)
    assert_same(src, dst)
    return st


def test_restore_connection_end_to_end(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b, cid, uuid = failed_over_pair(tmp_path, service)
    rid = restore_connect(b, a)
    st = settle(b, rid)  # the initial restore: Mirror Status Idle [L4719]
    assert st["mirror_status"] == "Idle" and st["target_data_state"] == "OK"
    assert_same(dst, src)
    assert not os.path.exists(os.path.join(src, "only-on-source.txt"))  # orphan removed
    # Restore Complete: the target's copy is OK again; the original connection is held
    until(lambda: copy_state(b, dst, uuid)["data_state"] == "OK", "Restore Complete on b")
    orig = conn(a, cid)
    assert orig["target_data_state"] == "Restore Required"
    assert orig["state"] == "Stopped" and orig["replication_status"] == "Stopped"
    assert orig["restore"]["state"] == "held" and "(rs_Restore)" in orig["restore"]["by"]
    held = [e for e in a.call("events") if e["id"] == 4018 and "held for" in e["message"]]
    assert len(held) == 1 and "(rs_Restore) from b" in held[0]["message"]
    until(lambda: conn(b, rid).get("restore", {}).get("state") == "replicating", "replicating")
    # the connection keeps replicating on-going changes target -> source [L4719]
    write(os.path.join(dst, "live.txt"), "changed on the target after the restore")
    os.unlink(os.path.join(dst, "a.txt"))
    settle(b, rid)
    assert_same(dst, src)
    ev_b = [e["id"] for e in b.call("events")]
    assert 4053 in ev_b and 4057 in ev_b and 98 in ev_b
    # disconnect when Ready: the original connection is Mirror Required [L4799], its
    # automatic difference mirror makes both copies OK, replication source -> target runs
    st = end_restore(a, b, cid, rid, src, dst)
    assert st["state"] == "Started" and st["stats"]["remirrors"] == 1
    assert st["restore"]["state"] == "released" and st["restore"]["in_sync"] is True
    until(lambda: copy_state(b, dst, uuid)["data_state"] == "OK", "b's copy OK")
    write(os.path.join(src, "after.txt"), "replicated source -> target again")
    settle(a, cid)
    assert_same(src, dst)


def test_no_echo_while_the_restore_connection_is_up(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b, cid, uuid = failed_over_pair(tmp_path, service)
    rid = restore_connect(b, a)
    settle(b, rid)
    sent_before = conn(a, cid)["stats"]["ops_sent"]
    applied_before = next(t for t in b.call("status")["targets"] if t["uuid"] == uuid)
    restore_uuid = conn(b, rid)["uuid"]
    for i in range(30):  # restored writes land on the source: none may come back
        write(os.path.join(dst, "burst", f"f{i}.txt"), f"burst {i}" * 100)
    settle(b, rid)
    time.sleep(1.0)  # give an echo time to show
    orig = conn(a, cid)
    assert orig["stats"]["ops_sent"] == sent_before
    assert orig["queued_items"] == 0 and orig["unacked_ops"] == 0
    applied = next(t for t in b.call("status")["targets"] if t["uuid"] == uuid)
    assert applied["ops_applied"] == applied_before["ops_applied"]
    assert applied["last_seq"] == applied_before["last_seq"]
    # the source applied what the restoration connection sent, nothing else
    got = next(t for t in a.call("status")["targets"] if t["uuid"] == restore_uuid)
    assert got["ops_applied"] > 0 and got["last_seq"] == conn(b, rid)["acked_seq"]
    assert_same(dst, src)


def test_backup_repset_used_and_restored_to_the_source(tmp_path: Any, service: Factory) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "keep.txt"), "kept")
    write(os.path.join(src, "tmp", "scratch"), "not replicated")
    write(os.path.join(src, "sub", "x.bin"), os.urandom(50_000))
    a, b = service("a"), service("b")
    rules = [f"{src} inc, rec", f"{src}/tmp exc, rec"]
    a.call("repset_create", name="rs", rules=rules)
    cid = int(a.call("connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst)["id"])
    settle(a, cid)
    # the target keeps the source's definition of the set [L4714]
    (copy,) = b.call("restore_repsets", repset="rs")
    assert copy["rules"] == rules and copy["source_base"] == src and copy["target_path"] == dst
    # the source loses its connection, its set and its data
    a.call("disconnect", con_id=cid)
    # a peer cannot change a set the source has: another "rs" is refused (-122)
    a.call("repset_create", name="rs", rules=[f"{src}/sub inc, rec"], replace=True)
    with pytest.raises(DtakeError, match="Replication set exists: rs"):
        b.call(
            "restore_connect",
            source=f"127.0.0.1:{a.port}",
            repset="rs",
            use_backup=True,
            restore_repset=True,
        )
    assert a.call("repset_show", name="rs")["rules"] == [f"{src}/sub inc, rec"]
    assert b.call("status")["connections"] == []  # nothing was started
    a.call("repset_delete", name="rs")
    os.unlink(os.path.join(src, "keep.txt"))
    os.unlink(os.path.join(src, "sub", "x.bin"))
    # without the backup the set comes from the source, which has none
    with pytest.raises(DtakeError, match="does not exist: rs"):
        b.call("restore_connect", source=f"127.0.0.1:{a.port}", repset="rs")
    rid = restore_connect(b, a, restore_repset=True)  # alone: the source has no set
    settle(b, rid)
    assert a.call("repset_show", name="rs")["rules"] == rules  # [L4715]
    with open(os.path.join(src, "keep.txt")) as fh:
        assert fh.read() == "kept"
    b.call("disconnect", con_id=rid)
    # with the restored set the source protects its data again
    cid = int(a.call("connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst)["id"])
    write(os.path.join(src, "later.txt"), "after the restore")
    settle(a, cid)
    assert not os.path.exists(os.path.join(dst, "tmp"))
    # the excluded directory was neither restored nor removed (orphans off)
    with open(os.path.join(src, "tmp", "scratch")) as fh:
        assert fh.read() == "not replicated"
    os.rename(os.path.join(src, "tmp"), str(tmp_path / "tmp-aside"))
    assert_same(src, dst)


def test_kill9_of_the_target_during_the_restore_connection(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b, cid, _ = failed_over_pair(tmp_path, service)
    for i in range(200):
        write(os.path.join(dst, "many", f"{i:03}.bin"), os.urandom(20_000))
    rid = restore_connect(b, a)
    until(lambda: conn(b, rid)["acked_seq"] > 0, "restore under way")
    b.kill9()
    write(os.path.join(dst, "while-down.txt"), "written while the target service was down")
    b.start()
    # the restoration connection comes back (same ID) and resumes with a difference mirror
    st = settle(b, rid)
    assert st["repset"] == "(rs_Restore)" and st["target_data_state"] == "OK"
    assert_same(dst, src)
    assert conn(a, cid)["restore"]["state"] == "held"  # still no echo
    end_restore(a, b, cid, rid, src, dst)


def test_kill9_of_the_source_keeps_its_connection_held(tmp_path: Any, service: Factory) -> None:
    src, dst, a, b, cid, _ = failed_over_pair(tmp_path, service)
    rid = restore_connect(b, a)
    settle(b, rid)
    a.kill9()
    write(os.path.join(dst, "while-source-down.txt"), "reaches the source after its restart")
    a.start()
    # held across the restart: no mirror source -> target over the newer copy
    orig = conn(a, cid)
    assert orig["restore"]["state"] == "held" and orig["mirror_status"] == "Idle"
    assert orig["target_data_state"] == "Restore Required"
    settle(b, rid)
    assert_same(dst, src)
    end_restore(a, b, cid, rid, src, dst)


def test_disconnect_before_the_restore_completed_leaves_restore_required(
    tmp_path: Any, service: Factory
) -> None:
    src, dst, a, b, cid, uuid = failed_over_pair(tmp_path, service)
    a.kill9()  # the source is unreachable: the restore cannot run
    rid = restore_connect(b, a, use_backup=True)
    time.sleep(0.5)
    b.call("disconnect", con_id=rid)
    assert copy_state(b, dst, uuid)["data_state"] == "Restore Required"
    assert 4056 in [e["id"] for e in b.call("events")]
    a.start()
    until(lambda: conn(a, cid)["state"] == "Started", "original connection reconnects")
    time.sleep(1.0)
    orig = conn(a, cid)
    assert orig["target_data_state"] == "Restore Required"  # visible; nothing was sent
    assert orig["stats"]["ops_sent"] == 0
    assert os.path.exists(os.path.join(dst, "new-on-target.txt"))
    # the operator overrides with a mirror [L5623]: the source's data wins
    a.call("mirror", con_id=cid, action="start", mode="differences")
    settle(a, cid)
    assert_same(src, dst)


def cli(svc: ServiceProcess, *argv: str) -> Any:
    out = sh(sys.executable, "-m", "dtake.cli.main", *argv, "--socket", svc.socket_path, "--json")
    return json.loads(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_restore_connection_blocks_the_source_and_reblocks_the_copy(
    tmp_path: Any, service: Factory
) -> None:
    """With the command line: `--block` keeps the users off the source while restoring
    [L4696]; the copy, unblocked by the failover, is blocked again by the restore
    (seed-engine §6.2)."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write(os.path.join(src, "f.txt"), "one")
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    r = a.call("connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst, block=True)
    cid = int(r["id"])
    try:
        settle(a, cid)
        assert b.call("blocked") == [dst]
        a.kill9()  # failover
        b.call("data_state_set", target=dst, state="Restore Required", reason="failover")
        a.start()
        until(lambda: conn(a, cid)["target_data_state"] == "Restore Required", "source holds")
        # the operator keeps the original connection from reconnecting by itself, as
        # renaming connect.sts does in the seed [L4690]
        a.call("transmit", con_id=cid, action="stop")
        until(lambda: conn(a, cid)["state"] == "Stopped", "original connection stopped")
        b.call("unblock", path=dst)  # failover unblocks [L5005]: the users change the copy
        write(os.path.join(dst, "f.txt"), "changed on the target")
        (copy,) = cli(b, "restore", "repsets")
        assert copy["rules"] == [f"{src} inc, rec"] and copy["target_path"] == dst
        res = cli(b, "restore", "connect", f"127.0.0.1:{a.port}", "--repset", "rs", "--block")
        assert res["repset"] == "(rs_Restore)" and res["restore_from"] == dst
        rid = int(res["id"])
        settle(b, rid)
        assert a.call("blocked") == [src]
        with pytest.raises(OSError) as exc:
            write(os.path.join(src, "intruder"), "x")
        assert exc.value.errno == errno.EROFS
        assert_same(dst, src)
        b.call("disconnect", con_id=rid)
        assert a.call("blocked") == []  # unblocked with the restoration connection
        assert b.call("blocked") == [dst]  # a restore re-blocks the copy
        assert conn(a, cid)["state"] == "Stopped"  # as the operator left it
        a.call("transmit", con_id=cid, action="start")
        until(lambda: conn(a, cid)["target_data_state"] == "OK", "original OK", timeout=60)
        write(os.path.join(src, "g.txt"), "two")
        settle(a, cid)
        assert_same(src, dst)
    finally:
        for svc, path in ((a, src), (b, dst)):
            with contextlib.suppress(Exception):
                svc.call("unblock", path=path)


def test_source_unreachable_at_disconnect_stays_held_until_released(
    tmp_path: Any, service: Factory
) -> None:
    src, dst, a, b, cid, uuid = failed_over_pair(tmp_path, service)
    rid = restore_connect(b, a)
    settle(b, rid)
    a.kill9()  # the source cannot be told that the restoration connection ends
    b.call("disconnect", con_id=rid)
    assert copy_state(b, dst, uuid)["data_state"] == "Restore Required"  # not in sync
    a.start()
    time.sleep(1.0)
    orig = conn(a, cid)
    assert orig["restore"]["state"] == "held" and orig["state"] == "Stopped"  # visible
    res = cli(a, "restore", "release", str(cid))
    assert res["restore"]["state"] == "released" and res["restore"]["in_sync"] is False
    # the target's copy says Restore Required: the original connection holds [L5623]
    until(lambda: conn(a, cid)["state"] == "Started", "original connection reconnects")
    time.sleep(0.5)
    orig = conn(a, cid)
    assert orig["target_data_state"] == "Restore Required" and orig["stats"]["ops_sent"] == 0
    a.call("mirror", con_id=cid, action="start", mode="differences")  # the operator's call
    st = settle(a, cid)
    assert st["target_data_state"] == "OK"
    assert copy_state(b, dst, uuid)["data_state"] == "OK"
    assert_same(src, dst)


def test_one_pass_restore_after_the_source_restarted_into_restore_required(
    tmp_path: Any, service: Factory
) -> None:
    """The source's automatic mirror at restart began before it learnt Restore Required
    and could never finish: `dtake restore ID` replaces it instead of refusing (-108)."""
    src, dst, a, b, cid, uuid = failed_over_pair(tmp_path, service)
    res = a.call("restore", con_id=cid, orphans="delete")
    assert res["files"] >= 1 and not os.path.exists(os.path.join(src, "only-on-source.txt"))
    assert_same(dst, src)
    until(lambda: copy_state(b, dst, uuid)["data_state"] == "OK", "target OK")
    write(os.path.join(src, "after.txt"), "replicated again")
    settle(a, cid)
    assert_same(src, dst)

"""btrfs snapshots through real services: the target path is a btrfs subvolume on a
loop device, so the target service picks the btrfs provider by itself (provider auto);
automatic snapshot before a mirror, manual take, revert (Snapshot Reverted), restore
to the source byte for byte, delete. Skipped with the reason where the machine cannot
mount btrfs on a loop device. The loop device and the mount are undone even on failure
(this fixture is set up before the services, so it is torn down after they stopped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dtake.testing import ServiceProcess, tree_diff
from tests.service_support import assert_same, settle, sh, until

Factory = Callable[..., ServiceProcess]


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    for tool in ("losetup", "mkfs.btrfs", "btrfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (btrfs-progs, util-linux)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices: /dev/loop-control is missing"
    with open("/proc/filesystems", encoding="ascii") as fh:
        if "btrfs" not in fh.read().split():
            return f"kernel {os.uname().release} has no btrfs (/proc/filesystems)"
    return None


WHY_NOT = why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture
def subvolume(tmp_path: Any) -> Iterator[str]:
    img, mnt = str(tmp_path / "btrfs.img"), str(tmp_path / "mnt")
    os.makedirs(mnt)
    with open(img, "wb") as fh:
        fh.truncate(256 * 1024 * 1024)
    sh("mkfs.btrfs", "-q", img)
    loop = sh("losetup", "-f", "--show", img).strip()
    mounted = False
    try:
        sh("mount", loop, mnt)
        mounted = True
        vol = os.path.join(mnt, "copy")
        sh("btrfs", "subvolume", "create", vol)
        yield vol
    finally:
        left = []
        if mounted and subprocess.run(["umount", mnt], check=False).returncode:
            left.append(f"umount {mnt}")
        if subprocess.run(["losetup", "-d", loop], check=False).returncode:
            left.append(f"losetup -d {loop}")
        if left:
            pytest.fail("cleanup left: " + ", ".join(left))


def write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def is_subvolume(path: str) -> bool:
    return subprocess.run(["btrfs", "subvolume", "show", path], capture_output=True).returncode == 0


def test_a_second_scan_sees_root_entries_replaced_after_the_first(subvolume: str) -> None:
    from dtake.service.apply import TargetTree

    write(os.path.join(subvolume, "a"), "1")
    tree = TargetTree(subvolume)
    try:
        assert [e.path for e in tree.scan("")] == ["a"]
        write(os.path.join(subvolume, "b"), "2")
        os.unlink(os.path.join(subvolume, "a"))
        assert [e.path for e in tree.scan("")] == ["b"]
    finally:
        tree.close()


def test_btrfs_snapshots_through_the_services(
    subvolume: str, tmp_path: Any, service: Factory
) -> None:
    dst = subvolume
    src = str(tmp_path / "src")
    write(os.path.join(src, "a.txt"), "version 1")
    write(os.path.join(src, "d", "b.bin"), os.urandom(300_000))
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    cid = int(a.call("connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst)["id"])
    settle(a, cid)
    assert_same(src, dst)
    # A user mirror moves OK -> Mirroring: the target snapshots its good copy first.
    a.call("mirror", con_id=cid, action="start", mode="full")
    auto = until(lambda: b.call("snapshot_list", target=dst), "automatic snapshot")[0]
    assert (auto["kind"], auto["provider"]) == ("auto", "btrfs")
    assert is_subvolume(auto["location"])  # a read-only subvolume, not a copy
    settle(a, cid)
    snap = b.call("snapshot_take", target=dst)
    assert snap["provider"] == "btrfs" and is_subvolume(snap["location"])
    good = tree_diff(src, dst)
    assert good == []
    write(os.path.join(src, "a.txt"), "version 2, after the snapshot")
    write(os.path.join(src, "new.txt"), "added after the snapshot")
    settle(a, cid)
    assert_same(src, dst)
    r = b.call("snapshot_revert", target=dst, snapshot=snap["id"])
    assert r["data_state"] == "Snapshot Reverted"
    with open(os.path.join(dst, "a.txt"), encoding="utf-8") as fh:
        assert fh.read() == "version 1"
    assert not os.path.exists(os.path.join(dst, "new.txt"))
    # The revert ended the session; the source learns the state when it reconnects.
    until(
        lambda: a.call("status")["connections"][0]["target_data_state"] == "Snapshot Reverted",
        "source sees Snapshot Reverted",
    )
    # Restore: the reverted copy comes back to the source, byte for byte.
    res = a.call("restore", con_id=cid, orphans="delete")
    assert res["files"] >= 1 and res["changed_during"] == 0
    assert_same(src, dst)
    until(lambda: b.call("data_state", target=dst)[0]["data_state"] == "OK", "target OK")
    write(os.path.join(src, "after.txt"), "replicated again")
    settle(a, cid)
    assert_same(src, dst)
    b.call("snapshot_delete", target=dst, snapshot=snap["id"])
    assert not os.path.exists(snap["location"])
    assert [s["id"] for s in b.call("snapshot_list", target=dst)] == [auto["id"]]

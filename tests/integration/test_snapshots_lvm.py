"""LVM thin snapshots for real: a thin pool on a loop device, an ext4 thin volume on
it, and the provider taking, reading, reverting and deleting snapshots of a target path
on that volume (dtake.service.snapshot.LvmThinProvider, with the real lvm2 tools).

Skipped, with the precise reason, where the machine cannot do it: not root, a tool
missing, no loop devices, or a kernel without device-mapper or its thin-pool target
(e.g. a Firecracker guest kernel built without CONFIG_BLK_DEV_DM and without modules).

Everything is named after this process (VG ``dtake_test_<pid>``, image
``/var/tmp/dtake_test_<pid>.img``) and undone in reverse order even when a step fails:
umount, lvremove, vgremove, pvremove, losetup -d, image removed. A cleanup step that
fails makes the test fail, so a leftover is never silent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dtake.service.snapshot import (
    LvmThinProvider,
    SnapshotRecord,
    SubprocessRunner,
    revert_into,
)
from tests.service_support import sh

TOOLS = (
    "losetup",
    "pvcreate",
    "vgcreate",
    "lvcreate",
    "lvs",
    "lvchange",
    "lvremove",
    "vgremove",
    "pvremove",
    "dmsetup",
    "thin_check",
    "mkfs.ext4",
)


def why_not() -> str | None:
    """None when this machine can build a thin pool on a loop device; else the reason."""
    if os.geteuid() != 0:
        return "needs root (losetup, LVM, mount)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (lvm2, thin-provisioning-tools, e2fsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices: /dev/loop-control is missing"
    with open("/proc/misc", encoding="ascii") as fh:
        misc = fh.read().split()
    if "device-mapper" not in misc:
        return (
            f"kernel {os.uname().release} has no device-mapper: no 'device-mapper' in "
            "/proc/misc (CONFIG_BLK_DEV_DM not built in, no dm_mod module loaded)"
        )
    r = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"dmsetup targets failed: {(r.stderr or r.stdout).strip()}"
    if "thin-pool" not in r.stdout.split():
        return "device-mapper has no thin-pool target (dm_thin_pool not built in or loaded)"
    return None


WHY_NOT = why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def fill(root: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w", encoding="utf-8") as fh:
            fh.write(text)


def content(root: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "lost+found"]
        for f in files:
            with open(os.path.join(d, f), encoding="utf-8") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


@pytest.fixture
def thin_volume(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An ext4 thin LV mounted at ``mnt``; every step undone in reverse order."""
    if subprocess.run(["pgrep", "-x", "systemd-udevd"], capture_output=True).returncode:
        # No udev to create the device nodes: libdevmapper makes them itself instead
        # of waiting for udev (the provider's own lvcreate/lvchange inherit this).
        monkeypatch.setenv("DM_DISABLE_UDEV", "1")
    pid = os.getpid()
    vg = f"dtake_test_{pid}"
    img = f"/var/tmp/dtake_test_{pid}.img"
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    undo: list[tuple[str, Callable[[], Any]]] = []

    def later(what: str, fn: Callable[[], Any]) -> None:
        undo.append((what, fn))

    try:
        with open(img, "wb") as fh:
            fh.truncate(512 * 1024 * 1024)  # sparse
        later("rm image", lambda: os.unlink(img))
        loop = sh("losetup", "-f", "--show", img).strip()
        later("losetup -d", lambda: sh("losetup", "-d", loop))
        sh("pvcreate", "-q", "-y", loop)
        later("pvremove", lambda: sh("pvremove", "-q", "-ff", "-y", loop))
        sh("vgcreate", "-q", vg, loop)
        later("vgremove", lambda: sh("vgremove", "-q", "-f", vg))
        # lvremove -f VG also removes snapshots a failed test left behind.
        later("lvremove", lambda: sh("lvremove", "-q", "-f", vg))
        sh("lvcreate", "-q", "--type", "thin-pool", "-L", "256M", "-n", "pool", vg)
        sh("lvcreate", "-q", "-V", "384M", "-T", f"{vg}/pool", "-n", "data")
        sh("mkfs.ext4", "-q", f"/dev/{vg}/data")
        sh("mount", f"/dev/{vg}/data", mnt)
        later("umount", lambda: sh("umount", mnt))
        yield {"vg": vg, "lv": "data", "mnt": mnt, "views": str(tmp_path / "views")}
    finally:
        failed = []
        for what, fn in reversed(undo):
            try:
                fn()
            except Exception as exc:  # keep undoing the rest, then report
                failed.append(f"{what}: {exc}")
        if failed:
            pytest.fail("cleanup left something behind: " + "; ".join(failed))


def test_lvm_thin_snapshot_take_view_revert_delete(thin_volume: dict[str, str]) -> None:
    vg, mnt = thin_volume["vg"], thin_volume["mnt"]
    target = os.path.join(mnt, "copy")
    original = {"a.txt": "one", "d/b.txt": "two", "d/e/c.txt": "three"}
    fill(target, original)
    runner = SubprocessRunner()
    p = LvmThinProvider(runner, thin_volume["views"])
    assert p.supports(target)
    assert not p.supports("/var/tmp")  # not on a thin volume
    rec = SnapshotRecord("t1", target, "manual", "lvm", "", 1.0)
    p.create(target, rec, timeout=60)
    assert rec.location == f"{vg}/dtake_t1"
    assert rec.subpath == "copy" and rec.reason == "ext4"
    lvs = sh("lvs", "--noheadings", "-o", "lv_name,pool_lv,lv_tags", vg)
    assert "dtake_t1" in lvs and "dtake" in lvs.split("dtake_t1", 1)[1]
    # The copy moves on; the snapshot keeps the moment it was taken.
    fill(target, {"a.txt": "changed", "new.txt": "added later"})
    os.unlink(os.path.join(target, "d", "e", "c.txt"))
    with p.view(rec) as view:
        assert content(view) == original
        revert_into(runner, view, target, timeout=60)
    assert content(target) == original
    # The view was unmounted and the snapshot deactivated again.
    assert not os.listdir(thin_volume["views"]) or all(
        not os.path.ismount(os.path.join(thin_volume["views"], d))
        for d in os.listdir(thin_volume["views"])
    )
    p.delete(rec)
    assert "dtake_t1" not in sh("lvs", "--noheadings", "-o", "lv_name", vg)


def test_lvm_thin_two_snapshots_are_independent(thin_volume: dict[str, str]) -> None:
    target = os.path.join(thin_volume["mnt"], "copy")
    fill(target, {"f": "v1"})
    runner = SubprocessRunner()
    p = LvmThinProvider(runner, thin_volume["views"])
    first = SnapshotRecord("s1", target, "scheduled", "lvm", "", 1.0)
    p.create(target, first, timeout=60)
    fill(target, {"f": "v2"})
    second = SnapshotRecord("s2", target, "scheduled", "lvm", "", 2.0)
    p.create(target, second, timeout=60)
    fill(target, {"f": "v3"})
    with p.view(first) as v1, p.view(second) as v2:
        assert content(v1) == {"f": "v1"} and content(v2) == {"f": "v2"}
    p.delete(first)
    with p.view(second) as v2:
        assert content(v2) == {"f": "v2"}  # deleting one leaves the other intact
    p.delete(second)
    assert content(target) == {"f": "v3"}

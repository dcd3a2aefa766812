"""What the machine must provide before the lab starts, each problem with its fix."""

from __future__ import annotations

import os
import shutil
import subprocess

from .settings import OVERLAYS

__all__ = ["check"]

APT_FIX = (
    "install the Debian packages: apt-get install pacemaker pacemaker-cli-utils corosync "
    "resource-agents fence-agents openssh-server openssh-client iproute2 util-linux "
    "(or `make deps`)"
)
# command -> package that provides it
COMMANDS = {
    "ip": "iproute2",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "corosync": "corosync",
    "corosync-cfgtool": "corosync",
    "corosync-keygen": "corosync",
    "pacemakerd": "pacemaker",
    "crm_mon": "pacemaker-cli-utils",
    "cibadmin": "pacemaker-cli-utils",
    "crm_attribute": "pacemaker-cli-utils",
    "crm_resource": "pacemaker-cli-utils",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _fs_type(path: str) -> str:
    """Filesystem type of the nearest existing ancestor of PATH (from /proc/self/mountinfo)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    best, fstype = "", "?"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt = left.split()[4]
            if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, right.split()[0]
    return fstype


def check(state_dir: str) -> list[str]:
    """Problems that stop the lab from running here (empty list: good to go)."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append(
            "the lab needs root (namespaces, mounts, veth): run it with sudo, "
            "e.g. `sudo .venv/bin/python -m lab up`"
        )
    missing = sorted(
        {pkg for cmd, pkg in COMMANDS.items() if shutil.which(cmd, path=SBIN_PATH) is None}
    )
    if missing:
        problems.append(f"missing packages {', '.join(missing)}: {APT_FIX}")
    for ns in ("net", "mnt", "uts", "ipc", "pid"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            problems.append(f"the kernel has no {ns} namespaces (CONFIG_{ns.upper()}_NS)")
    if not problems:
        r = subprocess.run(
            ["unshare", "--net", "--mount", "--uts", "--ipc", "--pid", "--fork", "true"],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            problems.append(
                f"cannot create namespaces ({r.stderr.strip()}): run on a VM or a "
                "`--privileged` container with CAP_SYS_ADMIN and CAP_NET_ADMIN"
            )
    with open("/proc/filesystems", encoding="utf-8") as f:
        fss = f.read()
    if "overlay" not in fss:
        problems.append("the kernel lacks overlayfs: `modprobe overlay`")
    if _fs_type(state_dir) in ("overlay", "aufs"):
        problems.append(
            f"state dir {state_dir} is on an overlay filesystem, which cannot hold the nodes' "
            "overlay upper dirs: pick one on tmpfs or ext4, e.g. "
            "`--state-dir /dev/shm/dtake-lab` (env DTAKE_LAB_STATE_DIR)"
        )
    real = os.path.realpath(state_dir)
    for tree in OVERLAYS:
        if real == tree or real.startswith(tree + "/"):
            problems.append(
                f"state dir {state_dir} is under {tree}, which every node overlays: "
                "pick one outside it, e.g. the default /run/dtake-lab-<prefix>"
            )
    return problems

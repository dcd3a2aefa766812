"""Network namespaces: the hub with its bridge, one namespace per node, sockets from inside.

Every link is created inside the lab's namespaces (the veth pair is born in
the hub with its peer moved straight into the node), so host networking is
never touched and no lab packet can reach it.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading

from .errors import LabError
from .settings import HOST_NETNS_DIR

__all__ = ["add_node", "create_hub", "delete", "exists", "ip", "open_socket", "path"]

CLONE_NEWNET = 0x40000000


def path(name: str) -> str:
    return f"{HOST_NETNS_DIR}/{name}"


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def create_hub(name: str, gateway_cidr: str) -> None:
    """The hub namespace with bridge br0 and the controller address (for ssh relays)."""
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    ip("-n", name, "link", "add", "br0", "type", "bridge")
    ip("-n", name, "addr", "add", gateway_cidr, "dev", "br0")
    ip("-n", name, "link", "set", "br0", "up")


def add_node(hub: str, name: str, index: int, cidr: str) -> None:
    """Namespace NAME with eth0 (CIDR) cabled to br0 in HUB through veth<INDEX>."""
    ip("netns", "add", name)
    veth = f"veth{index}"
    ip("-n", hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
    ip("-n", hub, "link", "set", veth, "master", "br0", "up")
    ip("-n", name, "link", "set", "lo", "up")
    ip("-n", name, "addr", "add", cidr, "dev", "eth0")
    ip("-n", name, "link", "set", "eth0", "up")


def set_cable(hub: str, index: int, *, up: bool) -> None:
    ip("-n", hub, "link", "set", f"veth{index}", "up" if up else "down")


def delete(name: str) -> None:
    if exists(name):
        ip("netns", "del", name)


def cleanup_dir() -> bool:
    """Remove /run/netns (created by `ip netns add`, a mount point) if no netns is left in it.

    Called only by a lab that found no /run/netns before it started. umount2(2)
    directly: umount(8) would create libmount's /run/mount on the host.
    """
    d = HOST_NETNS_DIR
    if not os.path.isdir(d) or os.listdir(d):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mounted = any(line.split()[4] == d for line in f)
    if mounted and libc.umount2(d.encode(), 0) != 0:
        return False  # busy: another lab made a netns meanwhile
    try:
        os.rmdir(d)
    except OSError:
        return False
    return True


def open_socket(netns: str, host: str, port: int, *, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside NETNS (a thread joins it; the process does not).

    The socket stays in that namespace, so Fabric/paramiko can use it as
    ``sock=`` and talk to a node without any route from the host.
    """
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["sock"] = socket.create_connection((host, port), timeout=timeout)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        err = box["error"]
        assert isinstance(err, BaseException)
        raise err
    sock = box["sock"]
    assert isinstance(sock, socket.socket)
    return sock

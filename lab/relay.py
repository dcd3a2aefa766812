"""ssh ProxyCommand: relay stdin/stdout to HOST:PORT from inside a network namespace.

Usage (what the lab's ssh_config runs): ``PYTHON relay.py /run/netns/<prefix>-hub %h %p``.
A plain script (no package imports). It joins the lab's hub network namespace
with setns(2), so the TCP connection starts and ends inside the lab: nothing
is routed through the host's network.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import socket
import sys

CLONE_NEWNET = 0x40000000


def join_netns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def relay(sock: socket.socket) -> None:
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "in")
    sel.register(sock, selectors.EVENT_READ, "sock")
    open_in = True
    while True:
        for key, _ in sel.select():
            if key.data == "in":
                data = os.read(0, 65536)
                if not data:
                    sel.unregister(0)
                    sock.shutdown(socket.SHUT_WR)
                    open_in = False
                else:
                    sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]
        if not open_in and not sel.get_map():
            return


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: relay.py NETNS_PATH HOST PORT", file=sys.stderr)
        return 2
    join_netns(sys.argv[1])
    with socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10) as sock:
        sock.settimeout(None)
        relay(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())

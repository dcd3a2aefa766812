"""Control API on a UNIX socket: one JSON request per line, one JSON response per line.

Request ``{"cmd": "status", "args": {...}}``; response ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"code": -130, "message": "..."}}``. Authorisation uses the
peer's credentials (SO_PEERCRED): root and members of the admin group may change state,
members of the monitor group may only read ("Double-Take Admin"/"Double-Take Monitors").
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import socket
import socketserver
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dtake.errors import DtakeError, E

if TYPE_CHECKING:
    from dtake.service.daemon import Service

__all__ = ["READ_ONLY", "ControlServer"]

log = logging.getLogger("dtake.control")

READ_ONLY = frozenset(
    {"ping", "status", "stats", "events", "repset_list", "repset_show", "wait", "verify_report"}
)


def _peer_groups(uid: int, gid: int) -> set[str]:
    names: set[str] = set()
    try:
        user = pwd.getpwuid(uid).pw_name
        gids = os.getgrouplist(user, gid)
    except KeyError:
        gids = [gid]
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return names


def authorise(svc: Service, uid: int, gid: int, cmd: str) -> None:
    if uid == 0 or uid == os.getuid():
        return
    groups = _peer_groups(uid, gid)
    if svc.cfg.admin_group in groups:
        return
    if (cmd in READ_ONLY or cmd in svc.extra_read_only) and svc.cfg.monitor_group in groups:
        return
    raise DtakeError(E.INSUFFICIENT_ACCESS, "Insufficient security access")


def dispatch(svc: Service, cmd: str, args: dict[str, Any]) -> Any:
    handlers: dict[str, Callable[..., Any]] = {
        "ping": lambda: {"pong": True, "node": svc.node_id},
        "status": svc.status,
        "stats": svc.stats,
        "events": lambda since=0, limit=1000: svc.events.since(int(since), int(limit)),
        "repset_create": svc.repset_create,
        "repset_list": svc.repset_list,
        "repset_show": svc.repset_show,
        "repset_delete": svc.repset_delete,
        "connect": svc.connect,
        "disconnect": svc.disconnect,
        "mirror": svc.mirror,
        "transmit": svc.transmit,
        "verify": svc.verify,
        "wait": svc.wait,
    }
    handlers.update(svc.extra_handlers)
    fn = handlers.get(cmd)
    if fn is None:
        raise DtakeError(E.INVALID_COMMAND, f"Command is not valid: {cmd!r}")
    try:
        return fn(**args)
    except TypeError as exc:
        raise DtakeError(E.INVALID_PARAMETER, f"{cmd}: {exc}") from exc


class _Handler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        for raw in self.rfile:
            try:
                req = json.loads(raw)
                cmd = str(req.get("cmd", ""))
                args = dict(req.get("args") or {})
                authorise(self.server.svc, uid, gid, cmd)
                result = dispatch(self.server.svc, cmd, args)
                resp: dict[str, Any] = {"ok": True, "result": result}
            except DtakeError as exc:
                resp = {"ok": False, "error": exc.to_dict()}
            except (ValueError, AttributeError) as exc:
                resp = {
                    "ok": False,
                    "error": {"code": E.INVALID_COMMAND, "message": f"bad request: {exc}"},
                }
            except Exception as exc:
                log.exception("control command failed")
                resp = {
                    "ok": False,
                    "error": {"code": E.UNKNOWN, "message": f"internal error: {exc}"},
                }
            try:
                self.wfile.write(json.dumps(resp, default=str).encode() + b"\n")
                self.wfile.flush()
            except OSError:
                return


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, svc: Service, path: str) -> None:
        self.svc = svc
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a dead daemon
            else:
                probe.close()
                raise DtakeError(E.UNKNOWN, f"another dtake service is listening on {path}")
        super().__init__(path, _Handler)
        # Everyone may connect; SO_PEERCRED decides what they may do.
        os.chmod(path, 0o666)

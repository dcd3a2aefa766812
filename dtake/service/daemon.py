"""`dtake serve`: one daemon per node holding both the source and the target module.

Threads: the peer listener (+ one per peer session), the capture reader, one worker
(+ ack reader, + mirror) per connection, and the control server. Every user action is
a method here that returns plain data; `control.py` exposes them on the UNIX socket
and the CLI renders them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from dtake.config import ServiceConfig
from dtake.errors import DtakeError, E
from dtake.protocol.auth import MIN_PROTOCOL_VERSION
from dtake.protocol.framing import PROTOCOL_VERSION
from dtake.rules import RuleError, RuleSet, parse_rule
from dtake.service.events import EventLog
from dtake.service.journal import Journals
from dtake.service.source import MIRROR_MODES, Connection, ConnRecord
from dtake.service.target import TargetServer

__all__ = ["Service", "Store", "serve"]

log = logging.getLogger("dtake")

# Feature modules: each defines install(svc) -> object, called at start before the
# connections are restored; it may register control commands (svc.register) and keep
# its object in svc.features[name].
FEATURES: tuple[str, ...] = (
    "dtake.service.datafeatures",
    "dtake.service.transmit",
    "dtake.service.replica",
    "dtake.service.restoreconn",
)

TEMP_MARK = ".dtake-"  # target temp files: ".<name>.dtake-<token>" (dtake.service.apply)


class Store:
    """JSON documents in the state directory, written atomically (temp + fsync + rename)."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self._lock = threading.Lock()

    def load(self, name: str, default: Any) -> Any:
        try:
            with open(os.path.join(self.dir, name), encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return default
        except (OSError, ValueError) as exc:
            raise DtakeError(
                E.UNKNOWN, f"{os.path.join(self.dir, name)}: unreadable state: {exc}"
            ) from exc

    def save(self, name: str, obj: Any) -> None:
        path = os.path.join(self.dir, name)
        with self._lock:
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(obj, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)


def _is_temp(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith(".") and TEMP_MARK in name


class Service:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_name
        for d in (cfg.state_dir, cfg.queue.disk_folder, os.path.dirname(cfg.control_socket)):
            os.makedirs(d, exist_ok=True)
        os.chmod(cfg.state_dir, 0o750)
        self.store = Store(cfg.state_dir)
        self.events = EventLog(cfg.log_file or os.path.join(cfg.state_dir, "dtake.log"))
        from dtake.protocol.auth import load_key

        self.key = load_key(cfg.auth_key_file)
        self.repsets: dict[str, RuleSet] = {}
        self.connections: dict[int, Connection] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.started = time.time()
        self.target = TargetServer(self)
        # Change journals after clean disconnects, detach tokens of target roots
        # (dtake.service.journal, docs/resync-journal.md).
        self.journals = Journals(self, max_paths=cfg.journal_max_paths)
        self.capture: Any = None
        self._capture_thread: threading.Thread | None = None
        self._watched: set[str] = set()
        # Feature modules (snapshots, replicas, schedules...) add control commands here:
        # name -> callable(**args); names in extra_read_only are allowed for dtmon.
        self.extra_handlers: dict[str, Callable[..., Any]] = {}
        self.extra_read_only: set[str] = set()
        self.features: dict[str, Any] = {}
        self._internal = tuple(
            os.path.normpath(p) for p in (cfg.state_dir, cfg.queue.disk_folder) if p
        )

    # ------------------------------------------------------------------ start/stop
    def start(self) -> None:
        from dtake.capture.inotify import InotifyCapture

        self.capture = InotifyCapture(prune=self.is_internal)
        for name, rules in self.store.load("repsets.json", {}).items():
            self.repsets[name] = RuleSet.from_list(rules)
        import importlib

        for name in FEATURES:
            self.features[name] = importlib.import_module(name).install(self)
        self.target.listen()
        self._capture_thread = threading.Thread(
            target=self._capture_loop, name="capture", daemon=True
        )
        self._capture_thread.start()
        for d in self.store.load("connections.json", []):
            rec = ConnRecord(**d)
            if rec.restore is None and rec.repset not in self.repsets:
                log.error(
                    "connection %d names missing replication set %s; dropped", rec.id, rec.repset
                )
                continue
            # The queue did not survive the restart: whatever changed while we were
            # down is found by a difference mirror (never a full copy) [L5048].
            if rec.target_data_state == "OK":
                rec.target_data_state = "Mirror Required"
            self._start_connection(rec, mirror="differences")
        self.events.emit(4003)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            conns = list(self.connections.values())
        for c in conns:
            c.stop()
        self.save_connections()
        self.target.close()
        self.journals.tokens.close()
        if self.capture is not None:
            self.capture.close()
        self.events.emit(4004)

    def register(self, name: str, fn: Callable[..., Any], *, read_only: bool = False) -> None:
        """Expose ``fn`` on the control socket as command ``name``."""
        self.extra_handlers[name] = fn
        if read_only:
            self.extra_read_only.add(name)

    def is_internal(self, path: str) -> bool:
        p = os.path.normpath(path)
        return any(p == d or p.startswith(d + "/") for d in self._internal)

    # ------------------------------------------------------------------ capture
    def _watch(self, rules: RuleSet) -> None:
        for root in rules.watch_roots():
            if root not in self._watched and os.path.isdir(root):
                self.capture.add_root(root)
                self._watched.add(root)

    def _rewatch(self) -> None:
        """Roots the capture dropped (deleted or moved away) are watched again once they
        exist again; what they hold by then is queued for every connection of a set that
        covers them (changes made before the watch was back are not lost)."""
        try:
            live = self.capture.roots
        except RuntimeError:  # a root added meanwhile: next round
            return
        with self._lock:  # _watch adds to it from connection start-up
            watched = list(self._watched)
        dropped = {r for r in watched if not any(r == w or r.startswith(w + "/") for w in live)}
        if not dropped:
            return
        for root in sorted(dropped):
            if not os.path.isdir(root):
                continue
            try:
                self.capture.add_root(root)
            except OSError as exc:
                log.warning("cannot watch %s again: %s", root, exc)
                continue
            log.warning("%s exists again: watched again, its contents queued", root)
            with self._lock:
                conns = [c for c in self.connections.values() if root in c.rules.watch_roots()]
            for c in conns:
                if c.replication != "Stopped" and not c._enqueue_subtree(root, "realtime"):
                    c.tx.exhausted(c.queue.exhausted_reason or "queue exhausted")

    def _capture_loop(self) -> None:
        from dtake.capture.inotify import EventKind

        names = {
            EventKind.CREATED: "created",
            EventKind.MKDIR: "mkdir",
            EventKind.MODIFIED: "modified",
            EventKind.CLOSED_WRITE: "closed_write",
            EventKind.ATTRIB: "attrib",
            EventKind.DELETED: "deleted",
            EventKind.MOVED: "moved",
        }
        rewatch_at = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= rewatch_at:
                rewatch_at = now + 0.5
                self._rewatch()
            try:
                events = self.capture.read(timeout=0.2)
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("capture read failed")
                self.journals.invalidate_all("change capture read failed")
                time.sleep(0.2)
                continue
            if not events:
                continue
            # A batch goes to the connections or to the journals that replaced them at
            # a disconnect, never to neither (the journal's dispatch lock).
            start = 0
            while start < len(events):
                with self.journals.dispatch_lock:
                    start, overflowed = self._dispatch(events, start, names)
                # Outside the lock (a gap restarts the mirror and waits for the old
                # one), and before the events that followed the overflow.
                for c in overflowed:
                    c.gap("inotify queue overflow")

    def _dispatch(
        self, events: list[Any], start: int, names: dict[Any, str]
    ) -> tuple[int, list[Connection]]:
        """Hand ``events[start:]`` to the connections and the journals, up to an
        overflow: (where to continue, the connections to remirror)."""
        from dtake.capture.inotify import EventKind

        with self._lock:
            conns = list(self.connections.values())
        journals = self.journals.active()
        for i in range(start, len(events)):
            ev = events[i]
            if ev.kind == EventKind.OVERFLOW:
                self.journals.invalidate_all("inotify queue overflow")
                return i + 1, conns
            kind = names[ev.kind]
            path, dest = ev.path, ev.dest
            if _is_temp(path):
                if kind != "moved" or dest is None or _is_temp(dest):
                    continue
                kind, path, dest = "created", dest, None  # temp renamed into place
            if kind == "created" and os.path.islink(path):
                kind = "symlink"
            for j in journals:
                j.mark_event(kind, path, is_dir=ev.is_dir, dest=dest)
            for c in conns:
                if kind == "moved":
                    c.on_change("moved", path, is_dir=ev.is_dir, dest=dest)
                elif c.rules.matches(path, is_dir=ev.is_dir or kind == "mkdir"):
                    c.on_change(kind, path, is_dir=ev.is_dir)
        return len(events), []

    def data_state_changed(self, conn: Connection, old: str, new: str) -> None:
        """Hook for target data state transitions (snapshots before good->bad, events)."""
        log.info("connection %d: target data state %s -> %s", conn.rec.id, old, new)
        from dtake.service.datastate import notify_target

        notify_target(self, conn, old, new)  # event 4065 + the target's own copy of it

    # ------------------------------------------------------------------ persistence
    def save_repsets(self) -> None:
        self.store.save("repsets.json", {n: r.to_list() for n, r in self.repsets.items()})

    def save_connections(self) -> None:
        with self._lock:
            recs = [c.rec.to_dict() for c in self.connections.values()]
        self.store.save("connections.json", recs)

    # ------------------------------------------------------------------ repsets
    def repset_create(
        self, name: str, rules: list[str], *, replace: bool = False
    ) -> dict[str, Any]:
        if not name or "/" in name:
            raise DtakeError(E.INVALID_PARAMETER, f"invalid replication set name {name!r}")
        if not rules:
            raise DtakeError(E.INVALID_PARAMETER, "a replication set needs at least one rule")
        try:
            parsed = [parse_rule(r) for r in rules]
        except RuleError as exc:
            raise DtakeError(
                E.INVALID_PARAMETER, str(exc), {"rule": exc.rule_text, "reason": exc.code}
            ) from exc
        rs = RuleSet(parsed)
        if not any(r.include for r in parsed):
            raise DtakeError(
                E.INVALID_PARAMETER, "a replication set needs at least one include rule"
            )
        with self._lock:
            old = self.repsets.get(name)
            if old is not None and not replace:
                if old.to_list() == rs.to_list():
                    return self.repset_show(name) | {"changed": False}
                raise DtakeError(E.REPSET_EXISTS, f"Replication set exists: {name}")
            if old is not None and self._repset_in_use(name):
                self.events.emit(99, repset=name)  # [L5208] connected set modified
            if old is not None:
                self.journals.invalidate_repset(name, "the replication set's rules changed")
            self.repsets[name] = rs
            self.save_repsets()
            for c in self.connections.values():
                if c.rec.repset == name:
                    c.rules = rs
        return self.repset_show(name) | {"changed": True}

    def _repset_in_use(self, name: str) -> bool:
        return any(c.rec.repset == name for c in self.connections.values())

    def repset_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.repset_show(n) for n in sorted(self.repsets)]

    def repset_show(self, name: str) -> dict[str, Any]:
        rs = self.repsets.get(name)
        if rs is None:
            raise DtakeError(E.REPSET_MISSING, f"Replication set does not exist: {name}")
        return {
            "name": name,
            "rules": rs.to_list(),
            "base": rs.base(),
            "connections": [c.rec.id for c in self.connections.values() if c.rec.repset == name],
        }

    def repset_delete(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self.repsets:
                raise DtakeError(E.REPSET_MISSING, f"Replication set does not exist: {name}")
            if self._repset_in_use(name):
                raise DtakeError(E.REPSET_IN_USE, f"Replication set is in use: {name}")
            del self.repsets[name]
            self.save_repsets()
            self.journals.invalidate_repset(name, "the replication set was deleted")
        return {"name": name, "deleted": True}

    # ------------------------------------------------------------------ connections
    def _start_connection(self, rec: ConnRecord, *, mirror: str | None) -> Connection:
        from dtake.service.restoreconn import connection_rules, held_for_restore

        rules = connection_rules(self, rec)  # a restoration connection has its own
        conn = Connection(self, rec, rules)
        if held_for_restore(self, conn):  # [L4799]: no mirror back while restoring
            mirror = None
        with self._lock:
            self.connections[rec.id] = conn
            self._watch(rules)  # capture starts before the first mirror walk
        self.save_connections()
        conn.start(mirror=mirror)
        return conn

    def connect(
        self,
        repset: str,
        host: str,
        port: int,
        target_path: str,
        *,
        mirror: str = "differences",
        orphans: str = "off",
        compression: str = "none",
        compression_level: int | None = None,
        block: bool = False,
        orphans_age_s: float = 0.0,
    ) -> dict[str, Any]:
        if mirror not in MIRROR_MODES:
            raise DtakeError(E.INVALID_OPTION, f"mirror must be one of {', '.join(MIRROR_MODES)}")
        if orphans not in ("off", "log", "delete", "move"):
            raise DtakeError(E.INVALID_OPTION, "orphans must be off, log, delete or move")
        if compression not in ("none", "zlib", "zstd"):
            raise DtakeError(E.INVALID_OPTION, "compression must be none, zlib or zstd")
        if not target_path.startswith("/"):
            raise DtakeError(E.INVALID_PARAMETER, f"target path must be absolute: {target_path!r}")
        with self._lock:
            rules = self.repsets.get(repset)
            if rules is None:
                raise DtakeError(E.REPSET_MISSING, f"Replication set does not exist: {repset}")
            base = rules.base()
            if not os.path.isdir(base):
                raise DtakeError(
                    E.SOURCE_PATH_INVALID, f"Source path is invalid: {base} does not exist"
                )
            for c in self.connections.values():
                if (c.rec.repset, c.rec.host, c.rec.port, c.rec.target_path) == (
                    repset,
                    host,
                    port,
                    target_path,
                ):
                    raise DtakeError(
                        E.CONNECTION_EXISTS, f"Connection already established (ID {c.rec.id})"
                    )
            ids = [c.rec.id for c in self.connections.values()]
            rec = ConnRecord(
                id=max(ids, default=0) + 1,
                repset=repset,
                host=host,
                port=port,
                target_path=os.path.normpath(target_path),
                mirror=mirror,
                orphans=orphans,
                orphans_age_s=float(orphans_age_s),
                block=bool(block),
                compression=compression,
                compression_level=compression_level,
                target_data_state="Mirror Required" if mirror != "none" else "OK",
            )
        conn = self._start_connection(rec, mirror=mirror)
        self.events.emit(87, con_id=rec.id)
        return conn.status()

    def _conn(self, con_id: int) -> Connection:
        c = self.connections.get(int(con_id))
        if c is None:
            raise DtakeError(E.NO_CONNECTION, f"Connection does not exist: {con_id}")
        return c

    def disconnect(self, con_id: int) -> dict[str, Any]:
        # The change journal takes over from the connection in one step for the
        # capture: what it no longer dispatches to the connection, the journal marks.
        with self.journals.dispatch_lock, self._lock:
            c = self._conn(con_id)
            del self.connections[c.rec.id]
            journal = self.journals.install(c)
        from dtake.service.datafeatures import before_disconnect

        # The target unblocks its path [L5005] and, asked, answers with a detach token.
        answer = before_disconnect(self, c, detach_token=journal is not None)
        c.stop()
        self.journals.settle(journal, c, answer)  # kept only if both sides were in sync
        self.save_connections()
        self.events.emit(4017, target=c.label, repset=c.rec.repset, con_id=c.rec.id)
        discarded = len(c.queue)
        c.queue.discard()  # its transaction logs go with it
        return {"id": c.rec.id, "disconnected": True, "discarded_items": discarded}

    def mirror(self, con_id: int, action: str, mode: str | None = None) -> dict[str, Any]:
        c = self._conn(con_id)
        if action == "start":
            c.start_mirror(
                mode or c.rec.mirror if (mode or c.rec.mirror) != "none" else "differences",
                override=True,  # a user's mirror overrides Restore Required [L5618]
            )
        elif action == "stop":
            c.stop_mirror()
        elif action == "pause":
            c.pause_mirror()
        elif action == "resume":
            c.resume_mirror()
        else:
            raise DtakeError(E.INVALID_COMMAND, f"unknown mirror action {action!r}")
        return c.status()

    def transmit(self, con_id: int, action: str) -> dict[str, Any]:
        c = self._conn(con_id)
        states = {"start": "Started", "stop": "Stopped", "pause": "Paused", "resume": "Started"}
        if action not in states:
            raise DtakeError(E.INVALID_COMMAND, f"unknown transmit action {action!r}")
        c.rec.transmit = states[action]
        c.tx.on_transmit(action)  # events 4014/4015, manual retry
        c.queue.notify()
        self.save_connections()
        return c.status()

    def verify(
        self, con_id: int, *, remirror: bool = False, checksum: bool = False
    ) -> dict[str, Any]:
        from dtake.service.verify import verify_connection

        c = self._conn(con_id)
        self.events.emit(4058, target=c.label, repset=c.rec.repset, con_id=c.rec.id)
        result = verify_connection(c, remirror=remirror, checksum=checksum)
        self.events.emit(4062, target=c.label, repset=c.rec.repset, con_id=c.rec.id)
        return result

    def wait(self, con_id: int, timeout_s: float = 300.0) -> dict[str, Any]:
        c = self._conn(con_id)
        if not c.wait_idle(float(timeout_s)):
            raise DtakeError(
                E.TIMEOUT,
                f"connection {con_id} not idle after {timeout_s:g}s",
                {"status": c.status()},
            )
        return c.status()

    def status(self) -> dict[str, Any]:
        with self._lock:
            conns = [c.status() for c in sorted(self.connections.values(), key=lambda c: c.rec.id)]
        return {
            "node": self.node_id,
            "version": _version(),
            # Peer protocol versions this build speaks: the upgrade playbook checks that
            # old and new builds overlap before a rolling upgrade.
            "protocol": [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION],
            "port": self.cfg.port,
            "uptime_s": round(time.time() - self.started, 1),
            "connections": conns,
            "targets": self.target.status(),
            # Change journals kept after clean disconnects, detach tokens held as a target.
            "journals": self.journals.status(),
            "detach_tokens": len(self.journals.tokens),
        }

    def stats(self) -> dict[str, Any]:
        st = self.status()
        return {
            "node": st["node"],
            "connections": [
                {"id": c["id"], **c["stats"], "queued_bytes": c["queued_bytes"]}
                for c in st["connections"]
            ],
            "targets": st["targets"],
            "watches": getattr(self.capture, "watch_count", 0),
        }

    def loop_conflict(self, source_node: str, target_path: str) -> str:
        """Active/active echo guard [L394]: refuse a target path that this node
        replicates back to the same source node."""
        tp = os.path.normpath(target_path)
        with self._lock:
            for c in self.connections.values():
                if getattr(c, "restore_hold", None):
                    continue  # held while the peer restores onto it (restoreconn)
                if c.peer_node and c.peer_node == source_node:
                    base = c.base
                    if tp == base or tp.startswith(base + "/") or base.startswith(tp + "/"):
                        return (
                            f"target path {tp} overlaps replication set {c.rec.repset} which "
                            f"{self.node_id} replicates back to {source_node}: this would loop"
                        )
        return ""


def _version() -> str:
    from dtake import __version__

    return __version__


def _sd_notify(msg: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.send(msg.encode())
        except OSError:
            pass


def serve(cfg: ServiceConfig) -> int:
    from dtake.service.control import ControlServer

    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s dtake[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    svc = Service(cfg)
    svc.start()
    ctl = ControlServer(svc, cfg.control_socket)
    done = threading.Event()

    def _term(signum: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    t = threading.Thread(target=ctl.serve_forever, name="control", daemon=True)
    t.start()
    _sd_notify("READY=1")
    log.info("dtake serving on %s:%d, control %s", cfg.bind, cfg.port, cfg.control_socket)
    done.wait()
    _sd_notify("STOPPING=1")
    ctl.shutdown()
    ctl.server_close()
    try:
        os.unlink(cfg.control_socket)  # supervisor hosts have no RuntimeDirectory= cleanup
    except FileNotFoundError:
        pass
    svc.stop()
    return 0

"""Restoration connections and the target's backup copy of replication sets
[L4674-4800, L346-350, L4714-4715] (listed in daemon.FEATURES).

The seed's restoration is a connection with the roles swapped, made from the target: the
target's copy is mirrored to the source ("the initial restoration is complete when the
Mirror Status is Idle"), then "the connection will continue replicating any on-going data
changes from the target to the source" until the operator disconnects it [L4719]. It is
named ``(<RS>_Restore)``.

Here it is an ordinary :class:`~dtake.service.source.Connection` of the TARGET node's
service (capture of its copy, mirror, queue, sequence numbers, acknowledgements) to the
source node's service, whose target module writes it beneath the set's base (confined
like every target write). Its rules are the set's rules mapped from the source's base
onto the copy (``ConnRecord.restore``), taken from the source (``repset_get``) or from
the target's backup copy of the set (``--use-backup-repset``).

Backup copy: every source sends its set's rules in ``open`` (``repset_rules``); the
target keeps them per connection in ``repset_backup.json``. ``--restore-repset`` writes
that copy back into the source service's sets (``repset_restore``).

No echo: while a restoration connection is open on a source node, that node's own
connections of the same data back to the requester are *held* (``restore_holds.json``,
so a restart keeps them held): capture suspended, transmission Stopped, target data
state Restore Required, nothing queued. The target's copy is Restore Required too while
the initial restore runs (it discards anything its original source might still send),
Restore Complete (OK) once the restore's mirror is Idle. Disconnecting the restoration
connection when it is in sync leaves the original connection in Mirror Required [L4799]
and, with auto-remirror, runs its difference mirror; disconnecting it earlier leaves
Restore Required on both sides (restore again, or override with ``dtake mirror start``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from dtake.config import split_hostport
from dtake.errors import DtakeError, E
from dtake.rules import Rule, RuleError, RuleSet, parse_rule
from dtake.service import datastate

if TYPE_CHECKING:
    from dtake.service.daemon import Service
    from dtake.service.source import Connection, ConnRecord
    from dtake.service.target import TargetState

__all__ = [
    "NAME",
    "RestoreConnections",
    "connection_rules",
    "held_for_restore",
    "install",
    "map_rules",
    "peer_query",
    "restore_closed",
    "restore_disconnecting",
    "restore_opening",
]

log = logging.getLogger("dtake.restoreconn")

NAME = "dtake.service.restoreconn"
BACKUP_STORE = "repset_backup.json"
HOLD_STORE = "restore_holds.json"


def map_rules(rules: list[str], base: str, dest: str) -> list[str]:
    """The set's rules moved from the source's ``base`` onto ``dest`` (the target's copy):
    ``/srv/www/cache exc, rec`` with base ``/srv/www`` and dest ``/copy/www`` gives
    ``/copy/www/cache exc, rec``. Rules outside the base (excludes that cannot apply)
    are left out."""
    b = "" if base == "/" else base.rstrip("/")
    d = "" if dest == "/" else os.path.normpath(dest).rstrip("/")
    out: list[str] = []
    for text in rules:
        r = parse_rule(text)
        if r.path != base and not r.path.startswith(b + "/"):
            continue
        rel = "" if r.path == base else r.path[len(b) :]
        out.append(str(Rule(d + rel or "/", r.include, r.recursive)))
    return out


def _overlap(a: str, b: str) -> bool:
    a, b = os.path.normpath(a), os.path.normpath(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class RestoreConnections:
    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self._lock = threading.Lock()
        self.backups: dict[str, dict[str, Any]] = dict(svc.store.load(BACKUP_STORE, {}))
        self.holds: dict[str, dict[str, Any]] = dict(svc.store.load(HOLD_STORE, {}))
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="restoreconn", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ backup copies
    def open_fields(self, conn: Connection) -> dict[str, Any]:
        """Added to every ``open``: the set's rules (the target keeps a backup copy), or
        for a restoration connection what it restores."""
        r = conn.rec.restore
        if r is not None:
            return {
                "restore": {
                    "repset": r["repset"],
                    "orig_uuid": r.get("orig_uuid", ""),
                    "from": r.get("from", ""),
                }
            }
        return {"repset_rules": conn.rules.to_list()}

    def target_opened(self, st: TargetState, req: dict[str, Any]) -> None:
        """Observer hook (TargetServer._open): keep the source's set definition."""
        rules = req.get("repset_rules")
        if not isinstance(rules, list) or not rules or req.get("restore"):
            return
        entry = {
            "uuid": st.uuid,
            "repset": st.repset,
            "rules": [str(x) for x in rules],
            "source_base": str(req.get("source_base", "")),
            "source_node": st.source_node,
            "target_path": st.target_path,
            "conn_id": st.conn_id,
        }
        with self._lock:
            old = self.backups.get(st.uuid)
            if old is not None and all(old.get(k) == v for k, v in entry.items()):
                return
            self.backups[st.uuid] = entry | {"updated": time.time()}
            data = dict(self.backups)
        self.svc.store.save(BACKUP_STORE, data)

    def copies(self, repset: str | None = None) -> list[dict[str, Any]]:
        """The copies held here (one per source connection) with the backup of their
        set's definition where the source sent one (`dtake restore repsets`)."""
        out: dict[str, dict[str, Any]] = {}
        for st in list(self.svc.target.states.values()):
            out[st.uuid] = {
                "uuid": st.uuid,
                "repset": st.repset,
                "source_node": st.source_node,
                "target_path": st.target_path,
                "conn_id": st.conn_id,
                "data_state": st.data_state,
                "rules": None,
                "source_base": None,
                "updated": None,
            }
        with self._lock:
            backups = [dict(b) for b in self.backups.values()]
        for b in backups:
            row = out.setdefault(
                b["uuid"],
                {
                    "uuid": b["uuid"],
                    "repset": b["repset"],
                    "source_node": b.get("source_node", ""),
                    "target_path": b["target_path"],
                    "conn_id": b.get("conn_id", 0),
                    "data_state": None,
                },
            )
            row.update(rules=b["rules"], source_base=b.get("source_base"), updated=b.get("updated"))
        rows = [r for r in out.values() if repset is None or r["repset"] == repset]
        return sorted(rows, key=lambda r: (r["repset"], r["target_path"], r["uuid"]))

    # ------------------------------------------------------------------ target node
    def connect(
        self,
        source: str,
        repset: str,
        *,
        from_path: str | None = None,
        use_backup: bool = False,
        restore_repset: bool = False,
        mirror: str = "differences",
        orphans: str = "off",
        orphans_age_s: float = 0.0,
        block: bool = False,
    ) -> dict[str, Any]:
        """`dtake restore connect SOURCE[:PORT] --repset NAME` on the target node."""
        from dtake.service.source import ConnRecord

        svc = self.svc
        if mirror not in ("full", "differences", "checksum"):
            raise DtakeError(E.INVALID_OPTION, "mirror must be full, differences or checksum")
        if orphans not in ("off", "log", "delete", "move"):
            raise DtakeError(E.INVALID_OPTION, "orphans must be off, log, delete or move")
        try:
            host, port = split_hostport(source)
        except ValueError as exc:
            raise DtakeError(E.INVALID_PARAMETER, f"bad source address: {exc}") from exc
        want = os.path.normpath(from_path) if from_path else None
        copies = [c for c in self.copies(repset) if want is None or c["target_path"] == want]
        if not copies:
            raise DtakeError(
                E.NO_REPSET,
                f"no copy of replication set {repset}"
                + (f" at {want}" if want else "")
                + f" on {svc.node_id} (see dtake restore repsets)",
            )
        if len(copies) > 1:
            raise DtakeError(
                E.INVALID_PARAMETER,
                f"{len(copies)} copies of replication set {repset} here: choose one with "
                f"--from ({', '.join(c['target_path'] for c in copies)})",
            )
        copy = copies[0]
        if (use_backup or restore_repset) and not copy["rules"]:
            raise DtakeError(
                E.NO_REPSET,
                f"no backup copy of replication set {repset} on {svc.node_id} "
                "(the source never sent its rules)",
            )
        if restore_repset:  # first: the source may have lost its set [L4715]
            _query(
                svc, host, port, {"op": "repset_restore", "name": repset, "rules": copy["rules"]}
            )
        if use_backup or restore_repset:  # the source's set now equals the copy
            rules = list(copy["rules"])
        else:  # the source's own definition [L4714]
            rules = list(_query(svc, host, port, {"op": "repset_get", "name": repset})["rules"])
        try:
            base = RuleSet.from_list(rules).base()
        except RuleError as exc:
            raise DtakeError(E.INVALID_PARAMETER, f"replication set {repset}: {exc}") from exc
        tp = os.path.normpath(copy["target_path"])
        if not os.path.isdir(tp):
            raise DtakeError(E.SOURCE_PATH_INVALID, f"Source path is invalid: {tp} does not exist")
        label = f"({repset}_Restore)"
        with svc._lock:
            for c in svc.connections.values():
                if c.rec.restore is not None and c.rec.restore.get("orig_uuid") == copy["uuid"]:
                    raise DtakeError(
                        E.CONNECTION_EXISTS, f"Connection already established (ID {c.rec.id})"
                    )
            rec = ConnRecord(
                id=max((c.rec.id for c in svc.connections.values()), default=0) + 1,
                repset=label,
                host=host,
                port=port,
                target_path=base,
                mirror=mirror,
                orphans=orphans,
                orphans_age_s=float(orphans_age_s),
                block=bool(block),
                target_data_state=datastate.MIRROR_REQUIRED,
                restore={
                    "repset": repset,
                    "rules": map_rules(rules, base, tp),
                    "from": tp,
                    "orig_uuid": copy["uuid"],
                    "source_node": copy["source_node"],
                    "use_backup": bool(use_backup),
                    "restore_repset": bool(restore_repset),
                    "completed": False,
                    "started": time.time(),
                },
            )
        # This copy becomes the reference: Restore Required (write-ahead), and its
        # original source, if connected, learns it by reconnecting [L5623].
        st = svc.target.states.get(copy["uuid"])
        if st is not None:
            if st.data_state not in datastate.HOLD:
                datastate.target_event(
                    svc,
                    st,
                    datastate.DataEvent.RESTORE_REQUIRED,
                    reason=f"restoration connection {label} to {host}:{port}",
                )
            sess = st.session
            if sess is not None:
                with contextlib.suppress(OSError):
                    sess.close()
        conn = svc._start_connection(rec, mirror=mirror)
        self._progress(conn)
        svc.events.emit(87, con_id=rec.id)
        svc.events.emit(97, con_id=rec.id)
        svc.events.emit(4053, target=conn.label, repset=label, con_id=rec.id)
        return conn.status() | {"restore_from": tp, "restore_to": base}

    @staticmethod
    def _progress(conn: Connection) -> None:
        r = conn.rec.restore or {}
        conn.restore_progress = {  # type: ignore[attr-defined]  # read by tx.status_fields
            "state": "replicating" if r.get("completed") else "restoring",
            "connection": conn.rec.repset,
            "from": r.get("from"),
            "to": f"{conn.label}:{conn.rec.target_path}",
            "use_backup_repset": bool(r.get("use_backup")),
            "started": r.get("started"),
            "completed": r.get("completed_at"),
        }

    def _completed(self, conn: Connection) -> None:
        """The initial restore is done: Mirror Status Idle [L4719]. Restore Complete."""
        r = conn.rec.restore
        if r is None:
            return
        r["completed"] = True
        r["completed_at"] = time.time()
        self.svc.save_connections()
        self._progress(conn)
        st = self.svc.target.states.get(str(r.get("orig_uuid")))
        if st is not None and st.data_state != datastate.OK:
            datastate.target_event(
                self.svc,
                st,
                datastate.DataEvent.RESTORE_COMPLETE,
                reason=f"Restore Complete: {conn.rec.repset}",
            )
        self.svc.events.emit(98, con_id=conn.rec.id)
        self.svc.events.emit(4057, target=conn.label, repset=conn.rec.repset, con_id=conn.rec.id)

    def disconnecting(self, conn: Connection) -> dict[str, Any]:
        """`dtake disconnect` of a restoration connection, before the source is told."""
        r = conn.rec.restore or {}
        in_sync = bool(r.get("completed")) and conn.idle()
        st = self.svc.target.states.get(str(r.get("orig_uuid")))
        if st is not None:
            if in_sync:
                # [L4799] the original connection is in Mirror Required: its mirror from
                # the source (whose data is this copy now) makes the copy OK again.
                datastate.target_event(
                    self.svc,
                    st,
                    new=datastate.MIRROR_REQUIRED,
                    reason=f"{conn.rec.repset} disconnected: mirror from the source required",
                )
                self._reblock(st)
            else:
                datastate.target_event(
                    self.svc,
                    st,
                    new=datastate.RESTORE_REQUIRED,
                    reason=f"{conn.rec.repset} disconnected before the source had all of it",
                )
        if not in_sync:
            self.svc.events.emit(
                4056, target=conn.label, repset=conn.rec.repset, con_id=conn.rec.id
            )
        return {"restore_done": in_sync}

    def _reblock(self, st: TargetState) -> None:
        """A restore re-blocks the target path [L5005] (when its connection blocks)."""
        f = self.svc.features.get("dtake.service.datafeatures")
        if f is None or not st.block or f.blocker.is_blocked(st.target_path):
            return
        try:
            f.blocker.block(st.target_path)
        except DtakeError as exc:
            log.error("%s", exc)

    # ------------------------------------------------------------------ source node
    def hold_for(self, req: dict[str, Any]) -> None:
        """A restoration connection opens here: hold this node's connections of the
        same data back to the requester (no echo of what it writes)."""
        r = req.get("restore") or {}
        requester = str(req.get("source_node", ""))
        path = str(req.get("target_path", ""))
        orig = str(r.get("orig_uuid", ""))
        label = f"({r.get('repset', '')}_Restore) from {requester}"
        with self.svc._lock:
            conns = list(self.svc.connections.values())
        for c in conns:
            if c.rec.restore is not None:
                continue
            if c.rec.uuid == orig or (c.peer_node == requester and _overlap(c.base, path)):
                self.hold(c, restore_uuid=str(req.get("uuid", "")), label=label)

    def hold(self, c: Connection, *, restore_uuid: str, label: str) -> None:
        with self._lock:
            h = self.holds.get(c.rec.uuid)
            new = h is None
            if h is None:
                h = {"transmit": c.rec.transmit, "since": time.time(), "con_id": c.rec.id}
            h.update(restore_uuid=restore_uuid, label=label)
            self.holds[c.rec.uuid] = h
            data = dict(self.holds)
        self.svc.store.save(HOLD_STORE, data)  # first: a restart keeps it held
        if c.mirror_status != "Idle":
            with contextlib.suppress(DtakeError):
                c.stop_mirror()
        self._apply_hold(c, h)
        if c.rec.target_data_state not in datastate.HOLD:
            c.data_state_reason = f"Restore Required: {label}"
            c.data_state_snapshot = False
            c.data_state_override = False
            c.set_data_state(datastate.RESTORE_REQUIRED)
        self.svc.save_connections()
        if new:
            log.warning("connection %d held: %s restores onto it", c.rec.id, label)
            self.svc.events.emit(4018, what=f"Connection {c.rec.id} held for {label}")

    @staticmethod
    def _apply_hold(c: Connection, h: dict[str, Any]) -> None:
        c.restore_hold = h["label"]  # type: ignore[attr-defined]  # read by loop_conflict
        c.replication = "Stopped"  # capture suspended: the restored writes are not queued
        c.rec.transmit = "Stopped"
        c.queue.clear()
        c.restore_progress = {  # type: ignore[attr-defined]
            "state": "held",
            "by": h["label"],
            "since": h.get("since"),
        }
        c.queue.notify()

    def release(self, restore_uuid: str, *, done: bool) -> list[int]:
        """The restoration connection was disconnected (``done``: in sync)."""
        with self._lock:
            mine = {u: h for u, h in self.holds.items() if h.get("restore_uuid") == restore_uuid}
            for u in mine:
                del self.holds[u]
            data = dict(self.holds)
        if not mine:
            return []
        self.svc.store.save(HOLD_STORE, data)
        with self.svc._lock:
            conns = {c.rec.uuid: c for c in self.svc.connections.values()}
        out = []
        for uuid, h in mine.items():
            c = conns.get(uuid)
            if c is not None:
                self._release(c, h, done=done)
                out.append(c.rec.id)
        return out

    def release_connection(self, con_id: int) -> dict[str, Any]:
        """`dtake restore release ID` on the source: the operator ends a hold whose
        restoration connection cannot say so (gone for good). The data state stays
        Restore Required: `dtake mirror start ID` overrides it [L4799, L5623]."""
        c = self.svc._conn(con_id)
        with self._lock:
            h = self.holds.pop(c.rec.uuid, None)
            data = dict(self.holds)
        if h is None:
            raise DtakeError(E.INVALID_PARAMETER, f"connection {con_id} is not held")
        self.svc.store.save(HOLD_STORE, data)
        self._release(c, h, done=False)
        return c.status()

    def _release(self, c: Connection, h: dict[str, Any], *, done: bool) -> None:
        svc = self.svc
        c.restore_hold = None  # type: ignore[attr-defined]
        c.queue.clear()
        c._sigs.clear()  # the files changed under the cached block signatures
        c._sig_blocks = 0
        c.rec.transmit = str(h.get("transmit") or "Started")
        c.restore_progress = {  # type: ignore[attr-defined]
            "state": "released",
            "by": h.get("label"),
            "since": h.get("since"),
            "ended": time.time(),
            "in_sync": done,
        }
        c.replication = "Pending"
        if done:
            # [L4799] "Your original connection on the source ... will be in a Mirror
            # Required state"; override: the target's Restore Required ends with it.
            c.data_state_reason = f"Mirror Required: {h.get('label')} disconnected"
            c.data_state_snapshot = False
            c.data_state_override = True
            c.set_data_state(datastate.MIRROR_REQUIRED)
        svc.save_connections()
        c.queue.notify()
        log.warning(
            "connection %d released (%s): %s",
            c.rec.id,
            h.get("label"),
            "Mirror Required" if done else "Restore Required (restore again or mirror start)",
        )
        if done and svc.cfg.auto_remirror:
            c.stats["remirrors"] += 1
            c.start_mirror(svc.cfg.auto_remirror_mode, restart=True)

    # ------------------------------------------------------------------ housekeeping
    def _loop(self) -> None:
        while not self.svc._stop.wait(0.2):
            try:
                self.tick()
            except Exception:
                log.exception("restore connection tick failed")

    def tick(self) -> None:
        with self.svc._lock:
            conns = list(self.svc.connections.values())
        for c in conns:
            r = c.rec.restore
            if r is not None:
                if (
                    not r.get("completed")
                    and c._fs is not None
                    and c.mirror_status == "Idle"
                    and c.rec.target_data_state == datastate.OK
                ):
                    self._completed(c)
            elif getattr(c, "restore_hold", None):
                # A gap (capture overflow) sets Pending: a held connection stays Stopped.
                c.replication = "Stopped"
                if len(c.queue):
                    c.queue.clear()


# ---------------------------------------------------------------------------- peers
def _query(svc: Service, host: str, port: int, req: dict[str, Any]) -> dict[str, Any]:
    """One request to a peer's service without a connection (its first frame)."""
    from dtake.protocol.auth import client_handshake
    from dtake.protocol.framing import FrameSocket, MsgType

    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        raise DtakeError(E.SERVER_NOT_RESPONDING, f"{host}:{port}: {exc}") from exc
    fs = FrameSocket(sock)
    try:
        client_handshake(fs, svc.key, node_id=svc.node_id)
        fs.send_obj(MsgType.REQUEST, {"id": 0, **req})
        mtype, resp = fs.recv_obj(timeout=30)
    except DtakeError:
        raise
    except Exception as exc:
        raise DtakeError(E.CONNECTION_FAILED, f"{host}:{port}: {exc}") from exc
    finally:
        fs.close()
    if mtype != MsgType.RESPONSE or resp.get("error"):
        raise DtakeError(int(resp.get("code", E.UNKNOWN)), f"{host}:{port}: {resp.get('error')}")
    return dict(resp)


def peer_query(svc: Service, req: dict[str, Any]) -> dict[str, Any]:
    """Answer ``repset_get`` / ``repset_restore`` (an authenticated peer's first frame)."""
    name = str(req.get("name", ""))
    try:
        if req.get("op") == "repset_get":
            return dict(svc.repset_show(name))
        if req.get("op") == "repset_restore":
            # Only a missing set (or the same one): a peer must not change what this
            # node replicates (-122 when a different set of that name exists).
            rules = [str(x) for x in req.get("rules") or []]
            res = svc.repset_create(name, rules, replace=False)
            if res.get("changed"):
                log.warning("replication set %s restored from the target's backup copy", name)
            return dict(res)
    except DtakeError as exc:
        return {"error": exc.message, "code": exc.code}
    return {"error": f"unknown request {req.get('op')!r}", "code": E.INVALID_COMMAND}


# ---------------------------------------------------------------------------- hooks
def _feat(svc: Service) -> RestoreConnections | None:
    f = svc.features.get(NAME)
    return f if isinstance(f, RestoreConnections) else None


def connection_rules(svc: Service, rec: ConnRecord) -> RuleSet:
    """A connection's rules: its set's, or a restoration connection's own."""
    if rec.restore is not None:
        return RuleSet.from_list(rec.restore["rules"])
    return svc.repsets[rec.repset]


def held_for_restore(svc: Service, conn: Connection) -> bool:
    """At (re)start: a connection held by a restoration connection stays held."""
    f = _feat(svc)
    if conn.rec.restore is not None:
        if f is not None:
            f._progress(conn)
        return False
    h = f.holds.get(conn.rec.uuid) if f is not None else None
    if h is None:
        return False
    RestoreConnections._apply_hold(conn, h)
    if conn.rec.target_data_state not in datastate.HOLD:
        conn.rec.target_data_state = datastate.RESTORE_REQUIRED
    return True


def restore_opening(svc: Service, req: dict[str, Any]) -> None:
    """Target module: a restoration connection opens (before the loop guard)."""
    f = _feat(svc)
    if f is not None:
        f.hold_for(req)


def restore_disconnecting(svc: Service, conn: Connection) -> dict[str, Any]:
    """Fields for the ``close`` request of a restoration connection."""
    f = _feat(svc)
    return f.disconnecting(conn) if f is not None else {}


def restore_closed(svc: Service, st: TargetState, req: dict[str, Any]) -> None:
    """Target module: ``close`` from a restoration connection releases the holds."""
    f = _feat(svc)
    if f is not None:
        f.release(st.uuid, done=bool(req.get("restore_done")))


def install(svc: Service) -> RestoreConnections:
    feat = RestoreConnections(svc)
    svc.register(
        "restore_connect",
        lambda source, repset, **kw: feat.connect(str(source), str(repset), **kw),
    )
    svc.register("restore_release", lambda con_id: feat.release_connection(int(con_id)))
    svc.register("restore_repsets", lambda repset=None: feat.copies(repset), read_only=True)
    observers = getattr(svc.target, "observers", None)
    if isinstance(observers, list):
        observers.append(feat)
    feat.start()
    return feat

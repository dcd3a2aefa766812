"""Data safety feature module: snapshots, blocked target paths, target data state,
orphans, restore, scheduled verification and statistics (listed in daemon.FEATURES).

``install(svc)`` builds one :class:`DataFeatures`, registers its control commands and
starts the 1-second scheduler thread. The core calls the small module-level hooks below
(``target_root``, ``target_opened``, ``peer_request``, ``write_dropped``,
``before_disconnect``); each one is a no-op when the feature is not installed.

Control commands (what the resource agents call on the TARGET node's service):

====================  =====================================================  =========
command               arguments                                              access
====================  =====================================================  =========
snapshot_take         target (uuid or path), kind="manual"                   admin
snapshot_list         target=None                                            read
snapshot_revert       target, snapshot (id | "latest" | "last-good")         admin
snapshot_delete       target, snapshot                                       admin
snapshot_schedule     target, interval_min, start (epoch), enabled, remove   admin
data_state            target=None                                            read
data_state_set        target, state, reason=""                               admin
block / unblock       path                                                   admin
blocked               -                                                      read
restore               con_id, mode="differences", orphans=None               admin
verify_schedule       con_id, interval_min, start, remirror, checksum, ...   admin
dtstat                -                                                      read
====================  =====================================================  =========
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtake.errors import DtakeError, E
from dtake.service import datastate
from dtake.service.blocking import Blocker
from dtake.service.snapshot import MAX_SNAPSHOTS, SnapshotManager

if TYPE_CHECKING:
    from dtake.service.apply import TargetTree
    from dtake.service.daemon import Service
    from dtake.service.source import Connection
    from dtake.service.target import TargetState

__all__ = [
    "NAME",
    "DataFeatures",
    "DataSafetyConfig",
    "before_disconnect",
    "install",
    "peer_request",
    "target_opened",
    "target_root",
    "write_dropped",
]

log = logging.getLogger("dtake.datafeatures")

NAME = "dtake.service.datafeatures"


@dataclass
class DataSafetyConfig:
    """``data_safety`` in the service config (schemas/service.schema.json)."""

    snapshot_dir: str = ""
    snapshot_provider: str = "auto"
    snapshot_max: int = MAX_SNAPSHOTS
    snapshot_timeout_s: float = 60.0
    orphans_move_dir: str = ""
    verify_log_folder: str = ""
    verify_log_filename: str = "DTVerify.log"
    verify_log_max_bytes: int = 1048576
    verify_log_append: bool = True
    log_max_file_bytes: int = 1048576
    log_max_files: int = 5
    metrics_port: int = 0  # 0 = no Prometheus endpoint (off by default)
    metrics_bind: str = "127.0.0.1"

    @classmethod
    def from_raw(cls, raw: dict[str, Any] | None, state_dir: str) -> DataSafetyConfig:
        raw = raw or {}
        s = raw.get("snapshots") or {}
        o = raw.get("orphans") or {}
        v = raw.get("verify_log") or {}
        lg = raw.get("log") or {}
        m = raw.get("metrics") or {}
        return cls(
            snapshot_dir=str(s.get("dir") or os.path.join(state_dir, "snapshots")),
            snapshot_provider=str(s.get("provider", "auto")),
            snapshot_max=int(s.get("max", MAX_SNAPSHOTS)),
            snapshot_timeout_s=float(s.get("timeout_s", 60.0)),
            orphans_move_dir=str(o.get("move_dir") or os.path.join(state_dir, "orphans")),
            verify_log_folder=str(v.get("folder") or state_dir),
            verify_log_filename=str(v.get("filename", "DTVerify.log")),
            verify_log_max_bytes=int(v.get("max_bytes", 1048576)),
            verify_log_append=bool(v.get("append", True)),
            log_max_file_bytes=int(lg.get("max_file_bytes", 1048576)),
            log_max_files=int(lg.get("max_files", 5)),
            metrics_port=int(m.get("port", 0)),
            metrics_bind=str(m.get("bind", "127.0.0.1")),
        )


class DataFeatures:
    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.cfg = DataSafetyConfig.from_raw(
            getattr(svc.cfg, "data_safety", None), svc.cfg.state_dir
        )
        self.blocker = Blocker(svc)
        self.snapshots = SnapshotManager(
            svc,
            snap_dir=self.cfg.snapshot_dir,
            provider=self.cfg.snapshot_provider,
            max_keep=self.cfg.snapshot_max,
            timeout_s=self.cfg.snapshot_timeout_s,
        )
        self.orphan_stats: dict[str, int] = {"files": 0, "dirs": 0, "bytes": 0}
        self.verify_schedules: dict[int, Any] = {}
        self._thread: threading.Thread | None = None
        self.metrics: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        # Log rotation settings of the service's event log (seed-monitoring.md §3.6).
        self.svc.events.max_file_bytes = self.cfg.log_max_file_bytes
        self.svc.events.max_files = self.cfg.log_max_files
        self.blocker.restore()
        from dtake.service.verify import VerifyScheduler

        self.verify = VerifyScheduler(self.svc, self.cfg)
        self._thread = threading.Thread(target=self._loop, name="data-scheduler", daemon=True)
        self._thread.start()
        if self.cfg.metrics_port:
            from dtake.service.metrics import MetricsServer

            self.metrics = MetricsServer(self.svc, self.cfg.metrics_bind, self.cfg.metrics_port)
            self.metrics.start()

    def _loop(self) -> None:
        # Evaluated every second, like the seed's schedules [L5497].
        while not self.svc._stop.wait(1.0):
            try:
                self.snapshots.tick()
                self.verify.tick()
            except Exception:
                log.exception("data scheduler tick failed")

    # ------------------------------------------------------------------ observer hooks
    # Called by TargetServer (svc.target.observers) and Connection._connect (open_fields).
    def target_root(self, path: str) -> str:
        return str(self.blocker.writable_path(path))

    def target_opened(self, st: TargetState, req: dict[str, Any]) -> None:
        target_opened(self.svc, st, req)

    def target_failed(self, st: TargetState, op: Any) -> None:
        write_dropped(self.svc, st, str(getattr(op, "path", "")), RuntimeError("apply failed"))

    def open_fields(self, conn: Connection) -> dict[str, Any]:
        return datastate.open_fields(conn)

    # ------------------------------------------------------------------ data state API
    def data_state(self, target: str | None = None) -> list[dict[str, Any]]:
        states = list(self.svc.target.states.values())
        if target:
            _, st = self.snapshots.resolve(target)
            states = [st] if st is not None else []
        out = []
        for st in states:
            snaps = self.snapshots.for_target(os.path.normpath(st.target_path))
            out.append(
                {
                    "uuid": st.uuid,
                    "conn_id": st.conn_id,
                    "source_node": st.source_node,
                    "repset": st.repset,
                    "target_path": st.target_path,
                    "data_state": st.data_state,
                    "good": datastate.is_good(st.data_state),
                    "reason": st.data_state_reason,
                    "connected": st.connected,
                    "last_seq": st.last_seq,
                    "blocked": self.blocker.is_blocked(st.target_path),
                    "snapshots": len(snaps),
                }
            )
        return out

    def data_state_set(self, target: str, state: str, reason: str = "") -> dict[str, Any]:
        """For the agents: e.g. Restore Required on failover, OK after accepting data."""
        if state not in datastate.STATES:
            raise DtakeError(
                E.INVALID_PARAMETER, f"state must be one of {', '.join(datastate.STATES)}"
            )
        _, st = self.snapshots.resolve(target)
        if st is None:
            raise DtakeError(E.NO_TARGET, f"no target connection for {target}")
        tr = datastate.target_event(self.svc, st, new=state, reason=reason or "set by operator")
        return {"uuid": st.uuid, "old": tr.old, "data_state": st.data_state}

    # ------------------------------------------------------------------ commands
    def register(self) -> None:
        r = self.svc.register
        sm = self.snapshots
        r("snapshot_take", lambda target, kind="manual": sm.take(str(target), kind=str(kind)))
        r("snapshot_list", lambda target=None: sm.list(target), read_only=True)
        r("snapshot_revert", lambda target, snapshot: sm.revert(str(target), str(snapshot)))
        r("snapshot_delete", lambda target, snapshot: sm.delete(str(target), str(snapshot)))
        r(
            "snapshot_schedule",
            lambda target, interval_min=None, start=None, enabled=None, remove=False: sm.schedule(
                str(target),
                interval_min=None if interval_min is None else float(interval_min),
                start=None if start is None else float(start),
                enabled=enabled,
                remove=bool(remove),
            ),
        )
        r("data_state", self.data_state, read_only=True)
        r("data_state_set", self.data_state_set)
        r("block", lambda path: self.blocker.block(str(path)))
        r("unblock", lambda path: self.blocker.unblock(str(path)))
        r("blocked", self.blocker.blocked, read_only=True)
        r("restore", self.restore)
        r("verify_schedule", lambda con_id, **kw: self.verify.set(int(con_id), **kw))
        r("dtstat", self.dtstat, read_only=True)
        r("metrics_text", self.metrics_text, read_only=True)

    def restore(
        self, con_id: int, mode: str = "differences", orphans: str | None = None
    ) -> dict[str, Any]:
        from dtake.service.restore import restore_connection

        return restore_connection(self.svc._conn(int(con_id)), mode=mode, orphans=orphans)

    def dtstat(self) -> dict[str, Any]:
        from dtake.service.metrics import collect

        return collect(self.svc)

    def metrics_text(self) -> str:
        from dtake.service.metrics import exposition

        return exposition(self.svc)


def install(svc: Service) -> DataFeatures:
    feat = DataFeatures(svc)
    feat.register()
    import dtake.service.target as target_module

    # target.py calls our hooks directly, or through its observer list: never both.
    direct = getattr(target_module, "write_dropped", None) is write_dropped
    observers = getattr(svc.target, "observers", None)
    if not direct and isinstance(observers, list):
        observers.append(feat)
    feat.start()
    return feat


def _feat(svc: Service) -> DataFeatures | None:
    f = svc.features.get(NAME)
    return f if isinstance(f, DataFeatures) else None


# ---------------------------------------------------------------------------- hooks
def target_root(svc: Service, st: TargetState, req: dict[str, Any]) -> str:
    """The path the target tree is opened on: blocks first when the source asks
    (the tree's fd must be taken on the writable mount underneath)."""
    f = _feat(svc)
    if f is None:
        return st.target_path
    if req.get("block"):
        try:
            f.blocker.block(st.target_path)
        except DtakeError as exc:
            log.error("%s", exc)
    return f.blocker.writable_path(st.target_path)


def target_opened(svc: Service, st: TargetState, req: dict[str, Any]) -> None:
    f = _feat(svc)
    st.block = bool(req.get("block"))
    if f is not None and st.block and not f.blocker.is_blocked(st.target_path):
        try:
            f.blocker.block(st.target_path)
        except DtakeError as exc:
            log.error("%s", exc)
    datastate.target_open(svc, st, req)


def write_dropped(svc: Service, st: TargetState, path: str, exc: BaseException) -> None:
    """An op failed on the target and is dropped [L4150]: automatic snapshot just
    before the drop (while still good), then Mirror Required [L5610]."""
    try:
        datastate.target_event(
            svc,
            st,
            datastate.DataEvent.WRITE_DROPPED,
            reason=f"Write Operation Dropped: {path}: {exc}",
            locked=True,
        )
    except Exception:
        log.exception("data state update after a dropped op failed")


def peer_request(
    svc: Service, st: TargetState, tree: TargetTree, req: dict[str, Any]
) -> dict[str, Any]:
    """In-band requests of this feature (answered in stream order by the target)."""
    try:
        return _peer_request(svc, st, tree, req)
    except DtakeError as exc:
        return {"error": exc.message, "code": exc.code}


def _peer_request(
    svc: Service, st: TargetState, tree: TargetTree, req: dict[str, Any]
) -> dict[str, Any]:
    op = req.get("op")
    f = _feat(svc)
    if op == "data_state":
        datastate.target_request(svc, st, req)
        return {"data_state": st.data_state}
    if op == "close":
        # The source disconnects for good: unblock [L5005] and keep the state; a detach
        # token when asked for and this side is clean (dtake.service.journal).
        if f is not None and f.blocker.is_blocked(st.target_path):
            f.blocker.unblock(st.target_path)
        from dtake.service.journal import issue_token
        from dtake.service.restoreconn import restore_closed

        restore_closed(svc, st, req)  # a restoration connection: release the holds
        return {"closed": True, **issue_token(svc, st, req)}
    if op == "orphans":
        from dtake.service.orphans import target_process

        move_dir = f.cfg.orphans_move_dir if f is not None else ""
        tp = os.path.normpath(st.target_path)
        if not move_dir or move_dir == tp or move_dir.startswith(tp + "/"):
            # Inside the replicated copy files would move again and again [L5086].
            move_dir = os.path.join(svc.cfg.state_dir, "orphans")
            svc.events.emit(4069)
        res = target_process(
            tree,
            req,
            move_dir=move_dir,
            uuid=st.uuid,
            emit=lambda eid: svc.events.emit(
                eid, node=svc.node_id, source=st.source_node, con_id=st.conn_id
            ),
        )
        if f is not None:
            for k in ("files", "dirs", "bytes"):
                f.orphan_stats[k] += getattr(res, k)
        return res.to_dict()
    if op == "digests_batch":
        # Verification: one whole-file digest per path, in order (None: no regular
        # file), hashed here while the source hashes its side (dtake.service.verify).
        from dtake.service.verify import target_digests_batch

        return {"digests": target_digests_batch(tree, [str(p) for p in req.get("paths") or []])}
    if op == "hashes_batch":
        # Block hashes of many files (verification: the bytes out of sync of files found
        # different; the whole comparison of sources from before digests_batch).
        from dtake.service.source import BLOCK
        from dtake.service.verify import target_hashes_batch

        if int(req.get("block_size", BLOCK)) != BLOCK:
            raise DtakeError(E.INVALID_PARAMETER, f"hashes_batch hashes {BLOCK}-byte blocks")
        return {"hashes": target_hashes_batch(tree, [str(p) for p in req.get("paths") or []])}
    if op == "read":
        # Restore reads the target copy back (confined, regular files only).
        fd = tree._open_regular_read(str(req["path"]))
        try:
            n = min(int(req.get("length", 1 << 20)), 4 << 20)
            data = os.pread(fd, n, int(req.get("offset", 0)))
            return {"data": data, "size": os.fstat(fd).st_size}
        finally:
            os.close(fd)
    raise DtakeError(E.INVALID_COMMAND, f"unknown request {op!r}")


def before_disconnect(
    svc: Service, conn: Connection, *, detach_token: bool = False
) -> dict[str, Any]:
    """``dtake disconnect``: tell the target (it unblocks its path) while we still can.
    ``detach_token``: ask for one (dtake.service.journal). The target's answer ({} when
    none came)."""
    extra: dict[str, Any] = {}
    if conn.rec.restore is not None:
        from dtake.service.restoreconn import restore_disconnecting

        extra = restore_disconnecting(svc, conn)  # this copy's state first [L4799]
    if conn._fs is None:
        return {}
    try:
        # Bounded: a target behind a partition never answers, and a disconnect (an agent's
        # stop, SourceConnection's in particular) must not wait minutes for it.
        ask = {"detach_token": True} if detach_token else {}
        chunks = conn._request("close", wait_s=5.0, **extra, **ask)
    except Exception as exc:
        log.info("connection %d: close not confirmed: %s", conn.rec.id, exc)
        return {}
    return dict(chunks[-1]) if chunks else {}

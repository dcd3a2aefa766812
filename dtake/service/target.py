"""Target side: accept authenticated peers, apply their ops in order, acknowledge.

Per connection (by its persistent UUID) the target keeps the last applied sequence
number and the open whole-file transfers, so a source that reconnects after a network
blip resumes exactly where it was; after a target restart the position is reloaded
from disk (written before each acknowledgement) and the source resyncs if it is behind.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtake.errors import E
from dtake.ops import Op, OpKind
from dtake.protocol.opwire import FILES_FEATURE
from dtake.service.datafeatures import peer_request, target_opened, target_root, write_dropped

if TYPE_CHECKING:
    from dtake.service.apply import TargetTree
    from dtake.service.daemon import Service

__all__ = ["TargetServer", "TargetState"]

log = logging.getLogger("dtake.target")

SCAN_CHUNK = 2000
CLEANUP_STORE = "target_cleanup.json"
# Cumulative acknowledgements: while more frames wait in the target queue, one ACK per
# this many ops / bytes / seconds (always one as soon as the queue is drained).
ACK_EVERY_OPS = 2048
ACK_EVERY_BYTES = 16 * 1024 * 1024
ACK_EVERY_S = 0.05
ACK_TAG = "ak"  # tag on the last op of a frame: the source asks for an ACK at once
# An apply failing with one of these is retried before the op is dropped (the seed's
# TGExecutionRetryLimit [L3761-3766]): the call changed nothing (or is repeated
# whole), and the condition may pass: space freed, a file made writable again
# (chattr -i), a program that held it exits. Event on the first failure: 4110 disk
# full, 4111 sharing violation, 4112 access denied, 4113 other; 4120 on success.
_RETRY_EVENT = {
    errno.ENOSPC: 4110,
    errno.EDQUOT: 4110,
    errno.ETXTBSY: 4111,
    errno.EBUSY: 4111,
    errno.EACCES: 4112,
    errno.EPERM: 4112,
}
_TRANSIENT = frozenset({errno.EINTR, errno.EAGAIN, errno.ENOMEM, *_RETRY_EVENT})
# Delays before each retry: 3.15 s in all, then the op is dropped [L4150]. Once an op
# was dropped, the next ones get the first two only, until one is applied: a lasting
# condition (an immutable directory) costs seconds once, not per op.
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


# Target data states in which ops are not applied (only their position is recorded).
HELD = ("Restore Required", "Snapshot Reverted")
WHOLE_RUN_MIN = 8  # consecutive independent whole-file ops written two at a time


def _whole_run(ops: list[Op], k: int, last_seq: int) -> list[Op]:
    """The whole-file ops from ``ops[k]`` on (FILE_END tagged ``whole``, not yet applied)
    whose paths are distinct and independent (none is a parent of another)."""
    run: list[Op] = []
    paths: set[str] = set()
    parents: set[str] = set()
    last_dir: str | None = None
    for op in ops[k:]:
        if op.kind != OpKind.FILE_END or not op.tags.get("whole") or op.seq <= last_seq:
            break
        path = op.path
        if path in paths or path in parents:
            break
        d = path.rpartition("/")[0]
        if d != last_dir:
            # A new directory: none of its ancestors may be a file of the run. (Ops in
            # one directory since the last check are siblings, never ancestors.)
            chain = []
            while d:
                if d in paths:
                    return run
                chain.append(d)
                d = d.rpartition("/")[0]
            parents.update(chain)
            last_dir = path.rpartition("/")[0]
        paths.add(path)
        run.append(op)
    return run


def _tq_figures(svc: Any, uuid: str) -> dict[str, Any]:
    from dtake.service.targetqueue import tq_figures

    return tq_figures(svc, uuid)


# In-band requests answered by dtake.service.datafeatures (data state, close, orphans, read,
# verification's batched digests and block hashes).
PEER_OPS = frozenset({"data_state", "close", "orphans", "read", "hashes_batch", "digests_batch"})
# First requests of a session answered without a connection (dtake.service.restoreconn).
PEER_QUERIES = frozenset({"repset_get", "repset_restore"})


@dataclass
class TargetState:
    uuid: str
    target_path: str
    source_node: str
    repset: str
    conn_id: int
    epoch: str = ""
    last_seq: int = 0
    tree: TargetTree | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    ops_applied: int = 0
    bytes_applied: int = 0
    failures: int = 0
    retries: int = 0  # applies retried after a transient error
    retrying: bool = False  # an op is being retried now (Target Status "Retrying")
    gave_up: bool = False  # the last op retried was dropped (next: quick retries only)
    connected: bool = False
    qid: str = ""  # the source queue's identity and the last item of it applied
    last_item: int = 0
    # Target data state of this copy (dtake.service.datastate), persisted write-ahead.
    data_state: str = "Mirror Required"
    data_state_reason: str = ""
    block: bool = False
    session: Any = None  # the live FrameSocket (a snapshot revert ends the session)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "target_path": self.target_path,
            "source_node": self.source_node,
            "repset": self.repset,
            "conn_id": self.conn_id,
            "epoch": self.epoch,
            "last_seq": self.last_seq,
            "qid": self.qid,
            "last_item": self.last_item,
            "data_state": self.data_state,
            "data_state_reason": self.data_state_reason,
            "block": self.block,
        }


class TargetServer:
    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.states: dict[str, TargetState] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._last_save = 0.0
        # Applied positions are persisted by a saver thread (at most twice a second),
        # never by the applier: an fsync must not stall the apply path.
        self._save_wanted = threading.Event()
        self._saver: threading.Thread | None = None
        # Feature objects notified of target events (dtake.service.replica): each may
        # define target_opened(st, req), target_barrier(st, op), target_failed(st, op).
        self.observers: list[Any] = []
        for d in svc.store.load("targets.json", []):
            st = TargetState(
                uuid=d["uuid"],
                target_path=d["target_path"],
                source_node=d.get("source_node", ""),
                repset=d.get("repset", ""),
                conn_id=int(d.get("conn_id", 0)),
                epoch=d.get("epoch", ""),
                last_seq=int(d.get("last_seq", 0)),
                qid=str(d.get("qid", "")),
                last_item=int(d.get("last_item", 0)),
                data_state=str(d.get("data_state", "Mirror Required")),
                data_state_reason=str(d.get("data_state_reason", "")),
                block=bool(d.get("block", False)),
            )
            self.states[st.uuid] = st
        # Temp files of interrupted transfers exist only after this service died without
        # a clean stop (a clean stop or a new source epoch aborts them): only then are
        # target roots swept, each once, at their next open. Persisted, so a root not
        # opened before the next clean stop is still swept later.
        mark = svc.store.load(CLEANUP_STORE, {})
        self._to_clean: set[str] = set(mark.get("paths") or [])
        if mark.get("running"):
            self._to_clean.update(st.target_path for st in self.states.values())
        self._save_cleanup(running=True)

    # ------------------------------------------------------------------ listener
    def listen(self) -> None:
        cfg = self.svc.cfg
        fam = socket.AF_INET6 if ":" in cfg.bind else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((cfg.bind, cfg.port))
        except OSError:
            s.close()
            self.svc.events.emit(4046, port=cfg.port)
            raise
        s.listen(64)
        self._sock = s
        t = threading.Thread(target=self._accept_loop, name="peer-listener", daemon=True)
        t.start()

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        self.save()
        for st in self.states.values():
            if st.tree is not None:
                st.tree.close()
                st.tree = None
        self._save_cleanup(running=False)

    def _save_cleanup(self, *, running: bool) -> None:
        self.svc.store.save(CLEANUP_STORE, {"running": running, "paths": sorted(self._to_clean)})

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(
                target=self._session, args=(conn, addr), name=f"peer-{addr[0]}", daemon=True
            )
            t.start()

    def save(self) -> None:
        with self._lock:
            data = [st.to_dict() for st in self.states.values()]
        self.svc.store.save("targets.json", data)

    # ------------------------------------------------------------------ session
    def _session(self, conn: socket.socket, addr: Any) -> None:
        from dtake.protocol.auth import server_handshake
        from dtake.protocol.errors import ProtocolError
        from dtake.protocol.framing import FrameSocket

        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fs = FrameSocket(conn)
        try:
            peer = server_handshake(fs, self.svc.key, node_id=self.svc.node_id)
        except ProtocolError as exc:
            self.svc.events.emit(51003, peer=str(addr[0]))
            log.warning("peer %s refused: %s", addr[0], exc)
            fs.close()
            return
        except OSError:
            fs.close()
            return
        self.svc.events.emit(72, source=str(addr[0]))
        state: TargetState | None = None
        try:
            state = self._serve(fs, peer)
        except (OSError, EOFError, ProtocolError) as exc:
            log.info("peer %s session ended: %s", addr[0], exc)
        except Exception:
            log.exception("peer %s session failed", addr[0])
        finally:
            # _serve may have raised after opening: find the state by its session.
            with self._lock:
                ended = [st for st in self.states.values() if st.session is fs]
            if state is not None and state not in ended:
                ended.append(state)
            for st in ended:
                st.connected = False
                st.session = None
                if st.tree is not None:
                    st.tree.release_dirs()
            if ended:
                self.save()
            fs.close()

    def _serve(self, fs: Any, peer: Any) -> TargetState | None:
        from dtake.protocol.framing import MsgType

        mtype, req = fs.recv_obj(timeout=60)
        if mtype == MsgType.REQUEST and req.get("op") in PEER_QUERIES:
            # One-off query without a connection (dtake.service.restoreconn).
            from dtake.service.restoreconn import peer_query

            fs.send_obj(MsgType.RESPONSE, {"id": 0, **peer_query(self.svc, req), "more": False})
            return None
        if mtype != MsgType.REQUEST or req.get("op") != "open":
            fs.send_obj(
                MsgType.RESPONSE, {"id": 0, "error": "expected open", "code": E.INVALID_COMMAND}
            )
            return None
        from dtake.service.journal import check_open_token

        token = check_open_token(self.svc, req)  # a detach token is consumed here
        state, err = self._open(req)
        if state is None:
            fs.send_obj(MsgType.RESPONSE, {"id": 0, "error": err, "code": E.TARGET_PATH_REFUSED})
            return None
        state.session = fs
        fs.send_obj(
            MsgType.RESPONSE,
            {
                "id": 0,
                "last_seq": state.last_seq,
                "qid": state.qid,
                "last_item": state.last_item,
                "data_state": state.data_state,
                "features": [FILES_FEATURE],  # what this target accepts beyond protocol 2
                **token,  # detach_token_valid/_reason (absent: none presented)
                "more": False,
            },
        )
        tree = state.tree
        assert tree is not None
        from dtake.protocol.opwire import ops_from_wire
        from dtake.service.targetqueue import ack_fields, frame_source

        frames = frame_source(self.svc, state, fs)  # the target queue

        def waiting() -> bool:  # frames received, not yet applied (in the target queue)
            return bool(getattr(frames, "frames", None))

        failed: list[dict[str, Any]] = []
        unacked_ops = unacked_bytes = 0
        last_ack = time.monotonic()
        while True:
            mtype, obj = frames.recv_obj(timeout=None)
            if mtype == MsgType.OPS:
                with state.lock:
                    ops = ops_from_wire(obj)
                    k = 0
                    while k < len(ops):
                        op = ops[k]
                        run = _whole_run(ops, k, state.last_seq)
                        if len(run) >= WHOLE_RUN_MIN and state.data_state not in HELD:
                            # Independent small files: written two at a time (apply.py).
                            results = tree.apply_whole_files(run)
                            for rop, res in zip(run, results, strict=True):
                                if isinstance(res, OSError) and res.errno in _TRANSIENT:
                                    state.retries += 1
                                    try:
                                        self._apply(state, tree, rop)
                                        res = None
                                    except Exception as exc:
                                        res = exc
                                self._applied(state, rop, res, failed)
                            unacked_ops += len(run)
                            unacked_bytes += sum(len(r.data) for r in run)
                            k += len(run)
                            continue
                        k += 1
                        if op.seq <= state.last_seq:
                            continue  # already applied (resent after a reconnect)
                        if state.data_state in HELD:
                            # [L5618-5621]: held until a restore or a user mirror; the
                            # source holds too once it has learnt the state.
                            self._note_item(state, op)
                            state.last_seq = op.seq
                            continue
                        dropped: Exception | None = None
                        try:
                            self._apply(state, tree, op)
                            if op.kind == OpKind.BARRIER and op.tags:
                                self._notify("target_barrier", state, op)
                        except Exception as exc:
                            dropped = exc
                        self._applied(state, op, dropped, failed)
                        unacked_ops += 1
                        unacked_bytes += len(op.data)
                    seq = state.last_seq
                now = time.monotonic()
                more = waiting()
                if (
                    more
                    and not failed
                    and not (ops and ops[-1].tags.get(ACK_TAG))  # the source asks for it now
                    and unacked_ops < ACK_EVERY_OPS
                    and unacked_bytes < ACK_EVERY_BYTES
                    and now - last_ack < ACK_EVERY_S
                ):
                    continue  # more frames are queued: one cumulative ACK later
                if not more:
                    tree.release_dirs()  # idle: no directory fd outlives a burst
                self._persist_position(state)
                fs.send_obj(MsgType.ACK, {"seq": seq, "failed": failed, **ack_fields(frames)})
                failed = []
                unacked_ops = unacked_bytes = 0
                last_ack = now
            elif mtype == MsgType.REQUEST:
                if unacked_ops:
                    # What came before the request is acknowledged before its answer.
                    self._persist_position(state)
                    fs.send_obj(
                        MsgType.ACK, {"seq": state.last_seq, "failed": [], **ack_fields(frames)}
                    )
                    unacked_ops = unacked_bytes = 0
                    last_ack = time.monotonic()
                tree.release_dirs()  # a request may change the tree (orphans) behind the cache
                self._answer(fs, tree, obj, state)
            elif mtype == MsgType.PING:
                fs.send_obj(MsgType.PONG, {})
            else:
                raise EOFError(f"unexpected frame {mtype}")

    @staticmethod
    def _note_item(state: TargetState, op: Op) -> None:
        if op.tags.get("qo"):
            # First op of a source queue item: all before it are applied.
            state.last_item = int(op.tags["qo"]) - 1

    def _applied(
        self, state: TargetState, op: Op, exc: BaseException | None, failed: list[dict[str, Any]]
    ) -> None:
        """Book an op as applied (or, with ``exc``, as dropped [L4150]: the target then
        needs a mirror), in sequence order."""
        self._note_item(state, op)
        if exc is not None:
            write_dropped(self.svc, state, op.path, exc)
            self._notify("target_failed", state, op)
            state.failures += 1
            failed.append({"seq": op.seq, "path": op.path, "error": str(exc)})
            log.warning("apply %s %s failed: %s", op.kind.name, op.path, exc)
        state.last_seq = op.seq
        state.ops_applied += 1
        state.bytes_applied += len(op.data)

    def _apply(self, state: TargetState, tree: TargetTree, op: Op) -> None:
        """``tree.apply(op)``, retried after a transient failure (``RETRY_DELAYS``)."""
        delays = RETRY_DELAYS[:2] if state.gave_up else RETRY_DELAYS
        tries = 0
        try:
            while True:
                try:
                    tree.apply(op)
                except OSError as exc:
                    if exc.errno not in _TRANSIENT or tries == len(delays):
                        state.gave_up = state.gave_up or tries > 0
                        raise
                    if tries == 0:
                        state.retrying = True
                        self.svc.events.emit(
                            _RETRY_EVENT.get(exc.errno or 0, 4113),
                            path=op.path,
                            limit=len(delays),
                            error=exc.strerror,
                        )
                    time.sleep(delays[tries])
                    tries += 1
                    state.retries += 1
                else:
                    if tries:
                        self.svc.events.emit(4120, path=op.path, retries=tries)
                    state.gave_up = False
                    return
        finally:
            state.retrying = False

    def _open(self, req: dict[str, Any]) -> tuple[TargetState | None, str]:
        from dtake.service.apply import TargetTree

        path = str(req.get("target_path", ""))
        if not path.startswith("/") or not self.svc.cfg.target_path_allowed(path):
            return None, f"target path {path!r} is not allowed on {self.svc.node_id}"
        if req.get("restore"):
            # A restoration connection [L4719]: this node's own connections back to the
            # requester are held first, so nothing restored is echoed back to it.
            from dtake.service.restoreconn import restore_opening

            restore_opening(self.svc, req)
        loop = self.svc.loop_conflict(str(req.get("source_node", "")), path)
        if loop:
            return None, loop
        uuid = str(req["uuid"])
        with self._lock:
            st = self.states.get(uuid)
            if st is None or st.target_path != path:
                st = TargetState(
                    uuid=uuid,
                    target_path=path,
                    source_node=str(req.get("source_node", "")),
                    repset=str(req.get("repset", "")),
                    conn_id=int(req.get("conn_id", 0)),
                )
                self.states[uuid] = st
            if st.epoch != req.get("epoch"):
                # A new source process: its sequence numbers start again at 1.
                st.epoch = str(req.get("epoch"))
                st.last_seq = 0
                if st.tree is not None:
                    st.tree.close()
                    st.tree = None
            if st.tree is None:
                st.tree = TargetTree(target_root(self.svc, st, req))  # blocked: fd path
                if path in self._to_clean:
                    st.tree.cleanup_temp()
                    self._to_clean.discard(path)
                    self._save_cleanup(running=True)
            if req.get("qid") and req.get("qid") != st.qid:
                st.qid, st.last_item = str(req["qid"]), 0  # another source queue
            st.connected = True
        target_opened(self.svc, st, req)  # block the path, adopt the data state
        # The data state persists itself write-ahead (datastate.target_event); the rest
        # (epoch, position reset) is saved lazily: lost, it only costs a resync.
        self._persist_position(st)
        self._notify("target_opened", st, req)
        return st, ""

    def _notify(self, hook: str, *args: Any) -> None:
        for ob in self.observers:
            fn = getattr(ob, hook, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception:
                    log.exception("target hook %s failed", hook)

    def _persist_position(self, state: TargetState) -> None:
        # Persisted lazily (at most twice a second, and when the session ends), by the
        # saver thread. After a target crash the reloaded position may be behind what
        # was acknowledged; the source then sees target_last < acked and runs a
        # difference mirror instead of trusting a position that could be wrong.
        self._save_wanted.set()
        if self._saver is None:
            with self._lock:
                if self._saver is None:
                    self._saver = threading.Thread(
                        target=self._save_loop, name="target-saver", daemon=True
                    )
                    self._saver.start()

    def _save_loop(self) -> None:
        while not self._stop.is_set():
            self._save_wanted.wait(1.0)
            if not self._save_wanted.is_set():
                continue
            self._save_wanted.clear()
            try:
                self.save()
            except Exception:
                log.exception("saving target positions failed")
            self._stop.wait(0.5)

    def _answer(
        self, fs: Any, tree: TargetTree, req: dict[str, Any], state: TargetState | None = None
    ) -> None:
        from dtake.protocol.framing import MsgType

        rid = req.get("id")
        op = req.get("op")
        try:
            if op == "scan" and req.get("rows"):
                # Compact rows [path, kind, size, mtime_ns, mode, uid, gid, link] (the
                # mirror's comparison), sent as the scan goes; "short": the first four.
                rows: list[list[Any]] = []
                short = bool(req.get("short"))
                for rows in tree.scan_rows(str(req.get("rel", "")), SCAN_CHUNK, short=short):
                    fs.send_obj(MsgType.RESPONSE, {"id": rid, "rows": rows, "more": True})
                fs.send_obj(MsgType.RESPONSE, {"id": rid, "rows": [], "more": False})
            elif op == "scan":
                batch: list[dict[str, Any]] = []
                for e in tree.scan(str(req.get("rel", ""))):
                    batch.append(
                        {
                            "path": e.path,
                            "kind": e.kind,
                            "size": e.size,
                            "mtime_ns": e.mtime_ns,
                            "mode": e.mode,
                            "uid": e.uid,
                            "gid": e.gid,
                            "link": e.link,
                        }
                    )
                    if len(batch) >= SCAN_CHUNK:
                        fs.send_obj(MsgType.RESPONSE, {"id": rid, "entries": batch, "more": True})
                        batch = []
                fs.send_obj(MsgType.RESPONSE, {"id": rid, "entries": batch, "more": False})
            elif op == "hashes":
                try:
                    hashes = tree.block_hashes(str(req["path"]), int(req.get("block_size", 65536)))
                    fs.send_obj(
                        MsgType.RESPONSE,
                        {"id": rid, "exists": True, "hashes": hashes, "more": False},
                    )
                except FileNotFoundError:
                    fs.send_obj(MsgType.RESPONSE, {"id": rid, "exists": False, "more": False})
            elif op == "digest":
                try:
                    d = tree.file_digest(str(req["path"]))
                    fs.send_obj(
                        MsgType.RESPONSE, {"id": rid, "exists": True, "digest": d, "more": False}
                    )
                except FileNotFoundError:
                    fs.send_obj(MsgType.RESPONSE, {"id": rid, "exists": False, "more": False})
            elif state is not None and op in PEER_OPS:
                res = peer_request(self.svc, state, tree, req)
                fs.send_obj(MsgType.RESPONSE, {"id": rid, **res, "more": False})
            else:
                fs.send_obj(
                    MsgType.RESPONSE,
                    {
                        "id": rid,
                        "error": f"unknown request {op!r}",
                        "code": E.INVALID_COMMAND,
                        "more": False,
                    },
                )
        except OSError as exc:
            fs.send_obj(
                MsgType.RESPONSE, {"id": rid, "error": str(exc), "code": E.UNKNOWN, "more": False}
            )

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    **st.to_dict(),
                    "connected": st.connected,
                    "ops_applied": st.ops_applied,
                    "bytes_applied": st.bytes_applied,
                    "failures": st.failures,
                    "retries": st.retries,
                    **_tq_figures(self.svc, st.uuid),
                    **({"target_status": "Retrying"} if st.retrying else {}),
                }
                for st in self.states.values()
            ]

    def forget(self, uuid: str) -> None:
        with self._lock:
            st = self.states.pop(uuid, None)
        if st is not None and st.tree is not None:
            st.tree.close()
        self.save()

"""Target queue and pause/resume of the target module (seed §5.2, §6.1 [L4957-4999]).

Each peer session gets a reader thread that takes frames off the socket into a
bounded in-memory queue; the session's applier (``dtake.service.target``) takes them
from there, in order. So ops received but not yet written — the target is paused, or
slower than the source — are the *target queue*, with figures (ops, bytes) in
``dtake status`` and, carried on ACK frames, in the source's connection status.

Bounded, and why no target disk logs: an op is acknowledged only once applied, so
everything in the target queue is still held by the source (in-flight window, then its
own queue, which spills to disk). When the target queue reaches its limit the reader
stops reading, TCP pushes back, and the rest stays queued on the source; a target
restart loses nothing (the source resends what was not acknowledged).

Pause [L4987-4999] is per target *server*: all sessions stop applying. Ops in progress
finish first: the status is "Pause Pending" until every applier is waiting, then
"Paused" (events 4026/4027). The network connection stays; the source keeps queueing.
Requests (scans, block hashes) wait in the same queue: they must see the ops before
them applied. The paused flag persists across restarts.

Discard (GeoCluster's Flush Target [L3387], control ``target_discard``): the ops of one
session that were received but not applied are dropped, with everything queued among
them (a data state note "OK" must not cover the hole). The copy then
misses changes of the source, so its data state becomes Mirror Required ("an operation
may have been dropped on the target" [L2945]; good -> bad takes the automatic snapshot
first), event 4065, and the session ends: nothing else from that source lands on a copy
that was cut short. A source that is still alive never got an acknowledgement for what
was dropped: it reconnects and sends it again or mirrors, so discarding is meant for a
source that is gone (the previously owning node failed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from dtake.errors import DtakeError, E

if TYPE_CHECKING:
    from dtake.service.daemon import Service
    from dtake.service.target import TargetState

__all__ = [
    "SessionQueue",
    "TargetQueues",
    "ack_fields",
    "frame_source",
    "install_target_queue",
    "tq_figures",
]

log = logging.getLogger("dtake.target")

FEATURE_KEY = "dtake.service.targetqueue"
STORE = "target_pause.json"
_STATUS_EVERY = 1.0  # while held, tell the source how the target queue stands


def _frame_cost(mtype: Any, obj: Any) -> tuple[int, int]:
    """(ops, bytes) of a received frame, for the queue figures and its limit."""
    from dtake.protocol.framing import MsgType

    if mtype == MsgType.OPS and isinstance(obj, list):
        size = 64 * len(obj)
        for item in obj:
            if type(item) is list and len(item) > 5:
                data = item[5]
                if isinstance(data, bytes | bytearray | memoryview):
                    size += len(data)
        return len(obj), size
    return 0, 256


class SessionQueue:
    """Frames of one peer session between the socket and the applier."""

    def __init__(self, tqs: TargetQueues, state: TargetState, fs: Any) -> None:
        self.tqs = tqs
        self.state = state
        self.fs = fs
        self.cond = threading.Condition()
        self.frames: deque[tuple[Any, Any, int, int]] = deque()
        self.ops = 0
        self.bytes = 0
        self.busy = True  # the applier is working on a frame it took
        self._error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name=f"tq-{state.conn_id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        from dtake.protocol.framing import MsgType

        last_status = 0.0
        try:
            while True:
                try:
                    mtype, obj = self.fs.recv_obj(timeout=_STATUS_EVERY)
                except TimeoutError:
                    mtype = None  # the stream is still usable: report, read on
                if mtype is not None:
                    ops, size = _frame_cost(mtype, obj)
                    with self.cond:
                        while self.bytes + size > self.tqs.max_bytes and self.frames:
                            # Full: stop reading; TCP holds the rest on the source.
                            self.cond.wait(0.5)
                            self._maybe_status(MsgType)
                        self.frames.append((mtype, obj, ops, size))
                        self.ops += ops
                        self.bytes += size
                        self.cond.notify_all()
                now = time.monotonic()
                if now - last_status >= _STATUS_EVERY:
                    last_status = now
                    self._maybe_status(MsgType)
        except BaseException as exc:  # EOF, protocol errors: handed to the applier
            with self.cond:
                self._error = exc
                self.cond.notify_all()

    def _maybe_status(self, msgtype: Any) -> None:
        if self.frames or self.tqs.paused:
            try:
                self.fs.send_obj(
                    msgtype.ACK,
                    {"seq": self.state.last_seq, "failed": [], "tq": self.figures()},
                )
            except Exception:
                pass

    def recv_obj(self, timeout: float | None = None) -> tuple[Any, Any]:
        """The applier's next frame (same contract as FrameSocket.recv_obj)."""
        with self.cond:
            self.busy = False
            self.tqs.changed()
            while not self.frames or self.tqs.paused:
                if self._error is not None and not self.frames:
                    raise self._error
                self.cond.wait(0.5)
            mtype, obj, ops, size = self.frames.popleft()
            self.ops -= ops
            self.bytes -= size
            self.busy = True
            self.cond.notify_all()
            return mtype, obj

    def __call__(self) -> tuple[Any, Any]:
        return self.recv_obj()

    def pending(self) -> bool:
        """Its frames may still be applied: the source is connected, or it is gone but the
        session's applier still runs (e.g. the target is paused), so what the source left
        is still queued. Once the session has ended, leftovers are never applied."""
        return self._error is None or self.state.session is self.fs

    def discard(self) -> tuple[int, int]:
        """Drop every queued frame and end the session: (ops, bytes) dropped. Requests
        go too: the session ends, so no answer could reach the source anyway."""
        with self.cond:
            ops, size = self.ops, self.bytes
            self.frames.clear()
            self.ops = self.bytes = 0
            if self._error is None:
                self._error = EOFError("target queue discarded")
            self.cond.notify_all()
        try:
            self.fs.close()  # the reader ends; the applier ends once the queue is empty
        except Exception:
            pass
        return ops, size

    def figures(self) -> dict[str, Any]:
        return {"ops": self.ops, "bytes": self.bytes, "status": self.tqs.status()}


class TargetQueues:
    def __init__(self, svc: Service) -> None:
        self.svc = svc
        q = svc.cfg.queue
        self.max_bytes = int(float(getattr(q, "target_memory_max_mb", 64)) * 1024 * 1024)
        self.sessions: dict[str, SessionQueue] = {}
        self._lock = threading.Lock()
        self.paused = bool(svc.store.load(STORE, {}).get("paused", False))

    def open(self, state: TargetState, fs: Any) -> SessionQueue:
        sq = SessionQueue(self, state, fs)
        with self._lock:
            self.sessions[state.uuid] = sq
        return sq

    def status(self) -> str:
        if not self.paused:
            return "OK"
        with self._lock:
            busy = any(s.busy and s._error is None for s in self.sessions.values())
        return "Pause Pending" if busy else "Paused"

    def changed(self) -> None:
        pass

    def _wake(self) -> None:
        with self._lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            with s.cond:
                s.cond.notify_all()

    def pause(self) -> dict[str, Any]:
        if not self.paused:
            self.paused = True
            self.svc.store.save(STORE, {"paused": True})
            self.svc.events.emit(4026)
        return self.show()

    def resume(self) -> dict[str, Any]:
        if self.paused:
            self.paused = False
            self.svc.store.save(STORE, {"paused": False})
            self.svc.events.emit(4027)
            self._wake()
        return self.show()

    def figures_for(self, uuid: str) -> dict[str, Any]:
        with self._lock:
            s = self.sessions.get(uuid)
        if s is None or not s.pending():
            return {"ops": 0, "bytes": 0}
        return {"ops": s.ops, "bytes": s.bytes}

    def discard(self, uuid: str, *, reason: str = "target queue discarded") -> dict[str, Any]:
        """Flush Target [L3387]: drop what session UUID received but did not apply."""
        from dtake.service.datastate import DataEvent, target_event

        with self._lock:
            s = self.sessions.get(uuid)
        if s is None:
            raise DtakeError(E.NO_CONNECTION, f"no target queue for connection {uuid}")
        ops, size = s.discard()
        st = s.state
        if ops:
            with st.lock:
                target_event(self.svc, st, DataEvent.OPS_LOST, reason=reason, locked=True)
        log.warning("target queue of %s discarded: %d ops, %d bytes (%s)", uuid, ops, size, reason)
        return {
            "uuid": uuid,
            "conn_id": st.conn_id,
            "discarded_ops": ops,
            "discarded_bytes": size,
            "data_state": getattr(st, "data_state", ""),
        }

    def discard_cmd(self, uuid: str = "", con_id: int = 0) -> dict[str, Any]:
        """Control ``target_discard``: by connection uuid, or by the source's connection ID."""
        if not uuid:
            with self._lock:
                found = [u for u, s in self.sessions.items() if s.state.conn_id == int(con_id)]
            if len(found) != 1:
                raise DtakeError(
                    E.NO_CONNECTION, f"no single target queue for connection ID {con_id}"
                )
            uuid = found[0]
        return self.discard(uuid, reason="target queue discarded by the user")

    def show(self) -> dict[str, Any]:
        with self._lock:
            live = {u: s for u, s in self.sessions.items() if s.pending()}
        return {
            "status": self.status(),
            "paused": self.paused,
            "queue_ops": sum(s.ops for s in live.values()),
            "queue_bytes": sum(s.bytes for s in live.values()),
            "max_bytes": self.max_bytes,
            "connections": [
                {"uuid": u, "conn_id": s.state.conn_id, "ops": s.ops, "bytes": s.bytes}
                for u, s in live.items()
            ],
        }

    def cmd(self, action: str = "status") -> dict[str, Any]:
        if action == "pause":
            return self.pause()
        if action == "resume":
            return self.resume()
        if action == "status":
            return self.show()
        raise DtakeError(E.INVALID_COMMAND, f"unknown target action {action!r}")


def frame_source(svc: Service, state: TargetState, fs: Any) -> Any:
    """What the target's session loop reads frames from: the target queue when the
    feature is installed, else the socket itself."""
    tqs = svc.features.get(FEATURE_KEY)
    if isinstance(tqs, TargetQueues):
        return tqs.open(state, fs)
    return fs


def ack_fields(frames: Any) -> dict[str, Any]:
    """Target queue figures carried on each ACK (the source shows them)."""
    if isinstance(frames, SessionQueue):
        return {"tq": frames.figures()}
    return {}


def tq_figures(svc: Service, uuid: str) -> dict[str, Any]:
    tqs = svc.features.get(FEATURE_KEY)
    if isinstance(tqs, TargetQueues):
        return {"target_queue": tqs.figures_for(uuid), "target_status": tqs.status()}
    return {}


def install_target_queue(svc: Service) -> TargetQueues:
    tqs = TargetQueues(svc)
    svc.features[FEATURE_KEY] = tqs
    svc.register("target", tqs.cmd)
    svc.register("target_discard", tqs.discard_cmd)
    return tqs

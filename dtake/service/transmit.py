"""Transmission control and connection recovery (seed §5.3, §12): feature module.

Per connection, ``TransmitControl`` (``conn.tx``) answers the worker's questions —
may we hold a socket now (transmit Started/Stopped/Paused, the schedule, recovery),
how long to wait before the next connection attempt, may captured changes be queued —
and owns the auto-disconnect / auto-reconnect / auto-remirror state machine
[L4973-5050]:

    normal --queue exhausted or retry limit--> (events 78, 4007, 85, 801, 4008;
        queue discarded, mirror stopped, Mirror Required, replication Pending)
      -> reconnecting (auto_reconnect on; event 80/4009 per attempt,
                       every reconnect_interval_s, at most reconnect_retry_limit
                       attempts, 0 = forever)
         -> connected: 4010; auto_remirror on -> mirror of auto_remirror_mode -> normal
                                   auto_remirror off -> pending (stays Pending until
                                   `dtake mirror start`)
         -> limit reached: 4011 -> failed (transmit Error; `dtake transmit start`
                                  tries again)
      -> disconnected (auto_reconnect off: transmit Error until `dtake transmit start`)

While a connection is auto-disconnected or Pending nothing is queued: the remirror
that must follow walks the whole set after capture resumed, so it covers every change
made in between, and queueing them would only exhaust the queue again.

Per (source, target IP), the ``Transmission`` feature object keeps what the seed
shares between all connections to one target IP [L5501, L5534, L5573]: the
transmission schedule, the bandwidth limit (one token bucket) and the compression
setting; a ticker thread evaluates schedules and bandwidth periods once a second
[L5499] with an injectable clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dtake.errors import DtakeError, E
from dtake.service.schedule import BandwidthLimit, TokenBucket, TransmitSchedule

if TYPE_CHECKING:
    from dtake.service.daemon import Service
    from dtake.service.source import Connection

__all__ = ["FEATURE", "TargetSettings", "Transmission", "TransmitControl", "install"]

log = logging.getLogger("dtake.transmit")

FEATURE = "dtake.service.transmit"


class TargetSettings:
    """What all connections from this source to one target IP share."""

    def __init__(self, host: str, *, clock: Callable[[], float], sleep: Callable[[float], None]):
        self.host = host
        self.schedule = TransmitSchedule()
        self.bandwidth = BandwidthLimit()
        self.compression: tuple[str, int | None] | None = None  # None: per connection
        self.bucket = TokenBucket(clock=clock, sleep=sleep)
        self.period = ""
        self.sched_active = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "schedule": self.schedule.to_dict(),
            "bandwidth": self.bandwidth.to_dict(),
            "compression": list(self.compression) if self.compression else None,
        }


class Transmission:
    """The feature object: shared settings per target IP, ticker, control commands."""

    STORE = "transmission.json"

    def __init__(
        self,
        svc: Service,
        *,
        now: Callable[[], datetime] = datetime.now,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.svc = svc
        self.now = now
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.RLock()
        self.targets: dict[str, TargetSettings] = {}
        for d in svc.store.load(self.STORE, []):
            ts = self.settings(str(d["host"]))
            try:
                ts.schedule = TransmitSchedule.from_dict(d.get("schedule") or {})
                ts.bandwidth = BandwidthLimit.from_dict(d.get("bandwidth") or {})
            except DtakeError as exc:
                log.error("transmission settings for %s ignored: %s", ts.host, exc)
            comp = d.get("compression")
            ts.compression = (str(comp[0]), comp[1]) if comp else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def settings(self, host: str) -> TargetSettings:
        with self._lock:
            ts = self.targets.get(host)
            if ts is None:
                ts = TargetSettings(host, clock=self._clock, sleep=self._sleep)
                self.targets[host] = ts
            return ts

    def save(self) -> None:
        with self._lock:
            data = [ts.to_dict() for ts in self.targets.values()]
        self.svc.store.save(self.STORE, data)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._tick_loop, name="transmit-ticker", daemon=True)
        self._thread.start()

    def _tick_loop(self) -> None:
        while not self._stop.wait(1.0):  # the seed evaluates schedules once a second [L5499]
            try:
                self.tick()
            except Exception:
                log.exception("transmission schedule evaluation failed")

    def tick(self) -> None:
        """One evaluation of every schedule and bandwidth period."""
        now = self.now()
        with self.svc._lock:
            conns = list(self.svc.connections.values())
        by_host: dict[str, list[Connection]] = {}
        for c in conns:
            by_host.setdefault(c.rec.host, []).append(c)
        with self._lock:
            targets = list(self.targets.values())
        for ts in targets:
            group = by_host.get(ts.host, [])
            queued = sum(c.queue.bytes + c.queue.disk_bytes for c in group)
            empty = all(len(c.queue) == 0 and not c._inflight for c in group)
            was = ts.sched_active
            ts.sched_active = ts.schedule.tick(now, queued_bytes=queued, queue_empty=empty)
            if ts.schedule.enabled and was != ts.sched_active:
                self.svc.events.emit(81 if ts.sched_active else 82, target=ts.host)
                log.info("transmission to %s: %s", ts.host, ts.schedule.reason)
                for c in group:
                    c.queue.notify()
            kbps, period = ts.bandwidth.current(now)
            if kbps != ts.bucket.kbps:
                ts.bucket.set_rate(kbps)
                self.svc.events.emit(
                    4063, target=ts.host, limit="Unlimited" if kbps is None else f"{kbps:g} kbps"
                )
            if ts.bandwidth.mode == "scheduled" and period != ts.period:
                self.svc.events.emit(4064, target=ts.host, period=period, at=now.strftime("%c"))
            ts.period = period

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ feature hooks
    def open_fields(self, conn: Connection) -> dict[str, Any]:
        """Fields added to the connection's open request (dtake.service.source)."""
        j = conn.queue.journal
        return {"qid": j.qid} if j is not None else {}

    # ------------------------------------------------------------------ commands
    def _conns_to(self, host: str) -> list[Connection]:
        with self.svc._lock:
            return [c for c in self.svc.connections.values() if c.rec.host == host]

    def _host_of(self, target: str) -> str:
        """A target IP, or a connection ID standing for its target IP."""
        if target.isdigit():
            return self.svc._conn(int(target)).rec.host
        return target

    def cmd_schedule(
        self,
        target: str,
        action: str = "show",
        *,
        start_at: list[str] | None = None,
        start_queued_mb: float | None = None,
        stop_at: str | None = None,
        stop_after_min: float | None = None,
        window: list[str] | None = None,
    ) -> dict[str, Any]:
        host = self._host_of(target)
        ts = self.settings(host)
        if action == "set":
            new = TransmitSchedule(
                enabled=True,
                start_at=list(start_at or []),
                start_queued_mb=start_queued_mb,
                stop_at=stop_at,
                stop_after_min=stop_after_min,
                window=(window[0], window[1]) if window else None,
            )
            new.validate()
            ts.schedule = new
        elif action in ("enable", "disable"):
            cand = TransmitSchedule.from_dict(
                ts.schedule.to_dict() | {"enabled": action == "enable"}
            )
            ts.schedule = cand
        elif action == "clear":
            ts.schedule = TransmitSchedule()
        elif action != "show":
            raise DtakeError(E.INVALID_COMMAND, f"unknown schedule action {action!r}")
        if action != "show":
            self.save()
            self.tick()
        return {"target": host, "schedule": ts.schedule.to_dict(), "active": ts.sched_active}

    def cmd_bandwidth(
        self,
        target: str,
        action: str = "show",
        *,
        kbps: float | None = None,
        xml: str | None = None,
    ) -> dict[str, Any]:
        host = self._host_of(target)
        ts = self.settings(host)
        bw = ts.bandwidth
        if action == "none":
            new = BandwidthLimit("none", bw.fixed_kbps, bw.events)  # the schedule is kept
        elif action == "fixed":
            new = BandwidthLimit("fixed", kbps, bw.events)
        elif action == "scheduled":
            new = BandwidthLimit("scheduled", bw.fixed_kbps, bw.events)
        elif action == "import":
            if xml is None:
                raise DtakeError(E.INVALID_PARAMETER, "import needs the XML text")
            events = BandwidthLimit.events_from_xml(xml)  # replaces the whole schedule
            new = BandwidthLimit(bw.mode, bw.fixed_kbps, events)
        elif action in ("show", "export"):
            new = bw
        else:
            raise DtakeError(E.INVALID_COMMAND, f"unknown bandwidth action {action!r}")
        new.validate()
        if new is not bw:
            ts.bandwidth = new
            self.save()
            self.tick()
        out: dict[str, Any] = {
            "target": host,
            "bandwidth": ts.bandwidth.to_dict(),
            "period": ts.period,
            "limiter": ts.bucket.figures(),
        }
        if action == "export":
            out["xml"] = ts.bandwidth.to_xml()
        return out

    def cmd_compression(
        self,
        target: str,
        action: str = "show",
        *,
        algorithm: str = "zlib",
        level: int | None = None,
    ) -> dict[str, Any]:
        from dtake.protocol.compress import available_codecs, get_codec

        host = self._host_of(target)
        ts = self.settings(host)
        if action == "set":
            if algorithm not in ("none", "zlib", "zstd"):
                raise DtakeError(E.INVALID_OPTION, "compression must be none, zlib or zstd")
            try:
                get_codec(algorithm, level)
            except Exception as exc:
                raise DtakeError(E.INVALID_PARAMETER, f"compression: {exc}") from exc
            ts.compression = (algorithm, level)
        elif action == "off":
            ts.compression = ("none", None)
        elif action != "show":
            raise DtakeError(E.INVALID_COMMAND, f"unknown compression action {action!r}")
        if action != "show":
            for c in self._conns_to(host):
                c.tx.apply_compression(*ts.compression)  # type: ignore[misc]
            self.svc.save_connections()
            self.save()
        conns = [
            {
                "id": c.rec.id,
                **c.tx.wire_figures(),
                "compression": c.rec.compression,
                "level": c.rec.compression_level,
            }
            for c in self._conns_to(host)
        ]
        return {
            "target": host,
            "compression": list(ts.compression) if ts.compression else None,
            "available": {k: list(v) for k, v in available_codecs().items()},
            "connections": conns,
        }

    def cmd_show(self) -> dict[str, Any]:
        with self._lock:
            return {
                "targets": [
                    ts.to_dict() | {"active": ts.sched_active, "limiter": ts.bucket.figures()}
                    for ts in self.targets.values()
                ]
            }


class TransmitControl:
    """Per connection: gate, recovery state machine, bandwidth and byte counters."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.recovery = "normal"  # normal | reconnecting | pending | disconnected | failed
        self.attempts = 0
        self.failures = 0  # consecutive failed connection attempts
        self.auto_disconnects = 0
        self.auto_reconnects = 0
        self.target_queue: dict[str, Any] = {}
        self._wire_prev: tuple[int, int] = (0, 0)
        self._wire_fs: Any = None
        self.raw_sent = 0
        self.wire_sent = 0
        self._precharged = 0  # bytes charged by before_send for the frame being sent
        feat = self.feature
        if feat is not None:
            ts = feat.targets.get(conn.rec.host)
            if ts is not None and ts.compression is not None:
                conn.rec.compression, conn.rec.compression_level = ts.compression

    @property
    def feature(self) -> Transmission | None:
        f = self.conn.svc.features.get(FEATURE)
        return f if isinstance(f, Transmission) else None

    def _settings(self) -> TargetSettings | None:
        f = self.feature
        return f.targets.get(self.conn.rec.host) if f is not None else None

    # ------------------------------------------------------------------ gate
    def scheduled_idle(self) -> bool:
        ts = self._settings()
        return ts is not None and ts.schedule.enabled and not ts.sched_active

    def gate(self) -> str:
        """Started | Stopped (no socket) | Paused (socket kept, nothing sent)."""
        rec = self.conn.rec
        if rec.transmit in ("Stopped", "Paused"):
            return rec.transmit
        if self.recovery in ("disconnected", "failed"):
            return "Stopped"
        if self.scheduled_idle():
            return "Stopped"  # Scheduled: the socket is made only when criteria are met
        return "Started"

    def user_start(self) -> None:
        """`dtake transmit start`: also the manual retry after a failed auto-reconnect."""
        if self.recovery in ("disconnected", "failed"):
            self.recovery = "reconnecting"
            self.attempts = 0
            self.failures = 0

    # ------------------------------------------------------------------ recovery
    def _refresh(self) -> None:
        c = self.conn
        if self.recovery == "pending" and (
            c.mirror_status != "Idle" or c.rec.target_data_state == "OK"
        ):
            self.recovery = "normal"  # the user started a mirror [L5047]

    def accepting(self) -> bool:
        """May captured changes be queued? Not while a remirror is owed."""
        self._refresh()
        return self.recovery == "normal"

    def exhausted(self, why: str) -> None:
        """Queue exhausted (or repeated failures): auto-disconnect [L4973-4981]."""
        c = self.conn
        if self.recovery != "normal":
            return
        svc = c.svc
        ev = {"target": c.label, "repset": c.rec.repset, "con_id": c.rec.id}
        svc.events.emit(78)
        svc.events.emit(51002, con_id=c.rec.id)
        svc.events.emit(4007, reason=why, **ev)
        self.auto_disconnects += 1
        self.recovery = "reconnecting" if svc.cfg.auto_reconnect else "disconnected"
        self.attempts = 0
        if c.mirror_status != "Idle":
            c._mirror_cancel.set()
            c.mirror_status = "Idle"
            c.mirror_end_seq = None
            svc.events.emit(90, con_id=c.rec.id)
        c.queue.clear()
        c._sigs.clear()
        c._sig_blocks = 0
        c.set_data_state("Mirror Required")
        c.replication = "Pending"
        c._close_socket()
        with c._ack_cond:
            c._inflight.clear()
            c._inflight_bytes = 0
        svc.events.emit(85, repset=c.rec.repset)
        svc.events.emit(801, **ev)
        svc.events.emit(4008, **ev)

    def connect_failed(self) -> float:
        """After a failed attempt: seconds to wait before the next one."""
        cfg = self.conn.svc.cfg
        self.failures += 1
        limit = int(getattr(cfg, "reconnect_retry_limit", 0) or 0)
        if self.recovery == "reconnecting":
            self.attempts += 1
            if limit and self.attempts >= limit:
                self.recovery = "failed"
                self.conn.svc.events.emit(4011, repset=self.conn.rec.repset, target=self.conn.label)
        elif self.recovery == "normal" and limit and self.failures >= limit:
            # Repeated failures: the queue cannot drain; stop holding it (seed 4007).
            self.exhausted(f"{self.failures} failed connection attempts")
            if self.recovery == "reconnecting":
                self.recovery = "failed"
                self.conn.svc.events.emit(4011, repset=self.conn.rec.repset, target=self.conn.label)
        return float(cfg.reconnect_interval_s)

    def before_connect(self) -> None:
        if self.recovery == "reconnecting":
            c = self.conn
            if self.attempts == 0:
                c.svc.events.emit(80, target=c.label)
            c.svc.events.emit(4009, repset=c.rec.repset, target=c.label)

    def connected(self) -> None:
        self.failures = 0
        if self.recovery != "reconnecting":
            return
        c = self.conn
        self.auto_reconnects += 1
        c.svc.events.emit(4010, repset=c.rec.repset, target=c.label)
        if c.svc.cfg.auto_remirror:
            self.recovery = "normal"
            mode = str(getattr(c.svc.cfg, "auto_remirror_mode", "differences"))
            c.stats["remirrors"] += 1
            c.start_mirror(mode, restart=True)
        else:
            self.recovery = "pending"  # [L5047]: Pending until a mirror is started by hand

    def opened(self, resp: dict[str, Any]) -> None:
        """The target's answer to open: where to resume a queue reloaded after a
        restart of this service."""
        q = self.conn.queue
        j = q.journal
        if j is None or not q.reloaded:
            return
        if resp.get("qid") == j.qid:
            last = int(resp.get("last_item", 0))
            if last < j.acked_order:
                # The target lost items it had acknowledged: the queue cannot fill the
                # gap; a difference mirror must.
                self.conn._needs_resync = True
                q.clear()
                return
            q.resume_from(last)
        elif j.acked_order > 0:
            self.conn._needs_resync = True
            q.clear()

    # ------------------------------------------------------------------ sending
    def apply_compression(self, name: str, level: int | None) -> None:
        from dtake.protocol.compress import get_codec

        c = self.conn
        c.rec.compression, c.rec.compression_level = name, level
        c._codec = get_codec(name, level)

    def before_send(self, estimate: int) -> None:
        """Before an OPS frame of about ``estimate`` bytes leaves: wait for its budget
        under the shared bandwidth limit, so the frame is paid for before it is on the
        wire (``after_send`` corrects the charge to the real wire size)."""
        ts = self._settings()
        if ts is not None and ts.bucket.kbps:
            ts.bucket.consume(estimate)
            self._precharged += estimate

    def after_send(self, fs: Any, wire: int) -> None:
        """After each OPS frame: byte counters and the shared bandwidth limit."""
        st = fs.stats()
        if fs is not self._wire_fs:
            self._wire_fs, self._wire_prev = fs, (0, 0)
        raw, wire_total = st.bytes_sent_raw, st.bytes_sent_wire
        self.raw_sent += raw - self._wire_prev[0]
        self.wire_sent += wire_total - self._wire_prev[1]
        self._wire_prev = (raw, wire_total)
        ts = self._settings()
        if ts is not None:
            if self._precharged:
                ts.bucket.adjust(wire - self._precharged)  # compressed: usually a refund
            else:
                ts.bucket.consume(wire)  # no before_send: pay after the frame left
        self._precharged = 0

    def wire_figures(self) -> dict[str, Any]:
        return {
            "bytes_sent_uncompressed": self.raw_sent,
            "bytes_sent_compressed": self.wire_sent,
            "compression_ratio": round(self.raw_sent / self.wire_sent, 3)
            if self.wire_sent
            else None,
        }

    def ack_info(self, obj: dict[str, Any]) -> None:
        tq = obj.get("tq")
        if isinstance(tq, dict):
            self.target_queue = tq

    def on_transmit(self, action: str) -> None:
        """`dtake transmit start|stop|pause|resume` was applied to rec.transmit."""
        if action == "start":
            self.user_start()
        events = {"start": 4014, "resume": 4014, "stop": 4015, "pause": 4015}
        self.conn.svc.events.emit(events[action])

    # ------------------------------------------------------------------ status
    def decorate(self, base: dict[str, Any]) -> dict[str, Any]:
        return base | self.status_fields(base)

    def status_fields(self, base: dict[str, Any]) -> dict[str, Any]:
        c = self.conn
        self._refresh()
        out: dict[str, Any] = {
            "queue": c.queue.figures(),
            "recovery": self.recovery,
            "auto_disconnects": self.auto_disconnects,
            "auto_reconnects": self.auto_reconnects,
            "target_queue": {
                "ops": int(self.target_queue.get("ops", 0)),
                "bytes": int(self.target_queue.get("bytes", 0)),
            },
            "target_status": str(self.target_queue.get("status", "OK")),
            "compression_level": c.rec.compression_level,
            **self.wire_figures(),
        }
        restore = getattr(c, "restore_progress", None)  # dtake.service.restore
        if restore is not None:
            out["restore"] = dict(restore)
        ts = self._settings()
        if ts is not None:
            out["bandwidth_limit_kbps"] = ts.bucket.kbps
            out["schedule"] = {"enabled": ts.schedule.enabled, "active": ts.sched_active}
        if self.recovery in ("failed", "disconnected") and c.rec.transmit == "Started":
            out["state"] = "Error"
        elif base.get("state") in ("Stopped", "Error") and self.scheduled_idle():
            out["state"] = "Scheduled"
            out["commit_mode"] = "Scheduled"
        if self.recovery in ("reconnecting", "pending", "disconnected", "failed"):
            out["replication_status"] = "Pending"
        return out


def install(svc: Service) -> Transmission:
    from dtake.service.targetqueue import install_target_queue

    feat = Transmission(svc)
    svc.register("transmit_schedule", feat.cmd_schedule)
    svc.register("bandwidth", feat.cmd_bandwidth)
    svc.register("compression", feat.cmd_compression)
    svc.register("transmission_show", feat.cmd_show, read_only=True)
    install_target_queue(svc)
    feat.start()
    return feat

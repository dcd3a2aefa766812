"""Transmission limiting: schedules, windows and bandwidth (seed §12.2-12.3).

Pure logic with an injectable clock, so tests step through days without sleeping:

- ``TransmitSchedule`` [L5497-5526]: start criteria (times of day, an amount queued),
  stop criteria (a time of day, a duration), and a window that bounds everything and
  may cross midnight (21:00-04:00). Once started, transmission runs until the queue is
  empty or a stop criterion is met; nothing is ever sent outside the window, and a
  window alone never starts anything. Evaluated once per second by the caller.
- ``BandwidthLimit`` [L5528-5566]: none, fixed (kbps, never below 28.8 kbps, never 0),
  or a weekly schedule of edge-triggered events (the limit in force is the one of the
  latest event at or before now, wrapping to the previous week), exported to and
  imported from XML (import replaces the whole schedule).
- ``TokenBucket``: one per (source, target IP), shared by all connections to it; it
  keeps its own accounting (bytes, time waited) so tests and the benchmark can check
  the achieved rate without trusting wall-clock timing alone.
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dtake.errors import DtakeError, E

__all__ = [
    "DAYS",
    "MIN_KBPS",
    "BandwidthEvent",
    "BandwidthLimit",
    "TokenBucket",
    "TransmitSchedule",
    "parse_hhmm",
]

MIN_KBPS = 28.8  # [L5538]: "not below 100% of 28.8 Kbps"
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def parse_hhmm(text: str) -> int:
    """'21:30' -> minutes after midnight."""
    try:
        h, m = text.strip().split(":")
        hh, mm = int(h), int(m)
    except ValueError:
        raise DtakeError(E.INVALID_PARAMETER, f"time must be HH:MM, not {text!r}") from None
    if not (0 <= hh < 24 and 0 <= mm < 60):
        raise DtakeError(E.INVALID_PARAMETER, f"time out of range: {text!r}")
    return hh * 60 + mm


def _minute_of(now: datetime) -> float:
    return now.hour * 60 + now.minute + now.second / 60


def _crossed(last: datetime | None, now: datetime, hhmm: str) -> bool:
    """Did the daily time ``hhmm`` occur in (last, now]? (Robust to ticks > 1 s.)"""
    if last is None or now <= last:
        return False
    t = parse_hhmm(hhmm)
    day = last.replace(hour=0, minute=0, second=0, microsecond=0)
    while day <= now:
        at = day + timedelta(minutes=t)
        if last < at <= now:
            return True
        day += timedelta(days=1)
    return False


@dataclass
class TransmitSchedule:
    """Shared per (source, target IP) [L5501]. Times are local, HH:MM."""

    enabled: bool = False  # "Enable Transmission Limiting"; off keeps the settings
    start_at: list[str] = field(default_factory=list)  # daily start times
    start_queued_mb: float | None = None  # start once this much is queued
    stop_at: str | None = None  # daily stop time
    stop_after_min: float | None = None  # stop after transmitting this long
    window: tuple[str, str] | None = None  # (begin, end); may cross midnight
    # runtime state (not persisted)
    active: bool = field(default=False, compare=False)
    started: datetime | None = field(default=None, compare=False)
    last_tick: datetime | None = field(default=None, compare=False)
    reason: str = field(default="", compare=False)

    def validate(self) -> None:
        for t in [*self.start_at, *([self.stop_at] if self.stop_at else [])]:
            parse_hhmm(t)
        if self.window is not None:
            parse_hhmm(self.window[0])
            parse_hhmm(self.window[1])
            if self.window[0] == self.window[1]:
                raise DtakeError(E.INVALID_PARAMETER, "window begin and end must differ")
        if self.start_queued_mb is not None and self.start_queued_mb <= 0:
            raise DtakeError(E.INVALID_PARAMETER, "the queued amount must be > 0 MB")
        if self.stop_after_min is not None and self.stop_after_min <= 0:
            raise DtakeError(E.INVALID_PARAMETER, "the duration must be > 0 minutes")
        if self.enabled and not (self.start_at or self.start_queued_mb):
            # [L5522]: a window alone does not start transmission.
            raise DtakeError(
                E.INVALID_PARAMETER, "an enabled schedule needs a start criterion (time or amount)"
            )

    def in_window(self, now: datetime) -> bool:
        if self.window is None:
            return True
        b, e = parse_hhmm(self.window[0]), parse_hhmm(self.window[1])
        m = _minute_of(now)
        return b <= m < e if b < e else (m >= b or m < e)  # crosses midnight

    def tick(self, now: datetime, *, queued_bytes: int, queue_empty: bool) -> bool:
        """Evaluate once (the engine calls this every second); returns whether
        transmission may run now. ``reason`` says why the state last changed."""
        last, self.last_tick = self.last_tick, now
        if not self.enabled:
            self.active = True
            return True
        in_window = self.in_window(now)
        if self.active:
            stop = ""
            if not in_window:
                stop = "window ended"
            elif self.stop_at and _crossed(last, now, self.stop_at):
                stop = f"stop time {self.stop_at}"
            elif (
                self.stop_after_min is not None
                and self.started is not None
                and now - self.started >= timedelta(minutes=self.stop_after_min)
            ):
                stop = f"ran {self.stop_after_min:g} min"
            elif queue_empty:
                stop = "queue empty"
            if stop:
                self.active, self.started, self.reason = False, None, stop
        else:
            start = ""
            if in_window:
                for t in self.start_at:
                    if _crossed(last, now, t):
                        start = f"start time {t}"
                if (
                    not start
                    and self.start_queued_mb is not None
                    and queued_bytes >= self.start_queued_mb * 1024 * 1024
                ):
                    start = f"{self.start_queued_mb:g} MB queued"
            if start:
                self.active, self.started, self.reason = True, now, start
        return self.active

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "start_at": list(self.start_at),
            "start_queued_mb": self.start_queued_mb,
            "stop_at": self.stop_at,
            "stop_after_min": self.stop_after_min,
            "window": list(self.window) if self.window else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransmitSchedule:
        w = d.get("window")
        s = cls(
            enabled=bool(d.get("enabled", False)),
            start_at=[str(t) for t in d.get("start_at") or []],
            start_queued_mb=None
            if d.get("start_queued_mb") is None
            else float(d["start_queued_mb"]),
            stop_at=d.get("stop_at"),
            stop_after_min=None if d.get("stop_after_min") is None else float(d["stop_after_min"]),
            window=(str(w[0]), str(w[1])) if w else None,
        )
        s.validate()
        return s


# ---------------------------------------------------------------------------- bandwidth
def check_kbps(kbps: float) -> float:
    if kbps <= 0:
        # [L5540]: 0 is not allowed; a stop criterion halts transmission instead.
        raise DtakeError(E.INVALID_PARAMETER, "a bandwidth limit of 0 is not allowed; use stop")
    if kbps < MIN_KBPS:
        raise DtakeError(E.INVALID_PARAMETER, f"the bandwidth limit floor is {MIN_KBPS} kbps")
    return float(kbps)


@dataclass
class BandwidthEvent:
    name: str
    days: list[str]  # Mon..Sun
    start: str  # HH:MM
    kbps: float | None = None  # None = Unlimited (the default) [L5544]

    def validate(self) -> None:
        if not self.name:
            raise DtakeError(E.INVALID_PARAMETER, "a bandwidth event needs a name")
        bad = [d for d in self.days if d not in DAYS]
        if bad or not self.days:
            raise DtakeError(E.INVALID_PARAMETER, f"days must be among {', '.join(DAYS)}")
        parse_hhmm(self.start)
        if self.kbps is not None:
            check_kbps(self.kbps)


@dataclass
class BandwidthLimit:
    """Shared per (source, target IP) [L5534]."""

    mode: str = "none"  # none | fixed | scheduled
    fixed_kbps: float | None = None
    events: list[BandwidthEvent] = field(default_factory=list)  # kept when not in use

    def validate(self) -> None:
        if self.mode not in ("none", "fixed", "scheduled"):
            raise DtakeError(E.INVALID_OPTION, "bandwidth mode must be none, fixed or scheduled")
        if self.mode == "fixed":
            if self.fixed_kbps is None:
                raise DtakeError(E.INVALID_PARAMETER, "a fixed limit needs --kbps")
            check_kbps(self.fixed_kbps)
        for ev in self.events:
            ev.validate()
        if self.mode == "scheduled" and not self.events:
            # [L5562]: a running connection can switch to a schedule, not create one.
            raise DtakeError(E.INVALID_PARAMETER, "no bandwidth schedule exists: import one first")

    def current(self, now: datetime) -> tuple[float | None, str]:
        """(kbps or None for unlimited, name of the period in force)."""
        if self.mode == "fixed":
            return self.fixed_kbps, "fixed"
        if self.mode != "scheduled" or not self.events:
            return None, "none"
        week_min = now.weekday() * 1440 + _minute_of(now)
        best: tuple[float, BandwidthEvent] | None = None
        for ev in self.events:
            t = parse_hhmm(ev.start)
            for d in ev.days:
                at = DAYS.index(d) * 1440 + t
                age = (week_min - at) % (7 * 1440)  # wraps to the previous week
                if best is None or age < best[0]:
                    best = (age, ev)
        assert best is not None
        return best[1].kbps, best[1].name

    def to_xml(self) -> str:
        root = ET.Element("BandwidthSchedule")
        for ev in self.events:
            ET.SubElement(
                root,
                "Event",
                {
                    "name": ev.name,
                    "days": ",".join(ev.days),
                    "start": ev.start,
                    "limit": "Unlimited" if ev.kbps is None else f"{ev.kbps:g}",
                },
            )
        ET.indent(root)
        return ET.tostring(root, encoding="unicode") + "\n"

    @staticmethod
    def events_from_xml(text: str) -> list[BandwidthEvent]:
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            raise DtakeError(E.INVALID_PARAMETER, f"bandwidth schedule XML: {exc}") from exc
        if root.tag != "BandwidthSchedule":
            raise DtakeError(E.INVALID_PARAMETER, "the root element must be <BandwidthSchedule>")
        out = []
        for el in root.findall("Event"):
            limit = el.get("limit", "Unlimited")
            try:
                kbps = None if limit.lower() == "unlimited" else float(limit)
            except ValueError:
                raise DtakeError(E.INVALID_PARAMETER, f"bad limit {limit!r}") from None
            ev = BandwidthEvent(
                name=el.get("name", ""),
                days=[d.strip() for d in el.get("days", "").split(",") if d.strip()],
                start=el.get("start", ""),
                kbps=kbps,
            )
            ev.validate()
            out.append(ev)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "fixed_kbps": self.fixed_kbps,
            "events": [asdict(e) for e in self.events],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BandwidthLimit:
        return cls(
            mode=str(d.get("mode", "none")),
            fixed_kbps=None if d.get("fixed_kbps") is None else float(d["fixed_kbps"]),
            events=[BandwidthEvent(**e) for e in d.get("events") or []],
        )


class TokenBucket:
    """Byte budget shared by all connections to one target IP.

    ``consume(n)`` charges ``n`` bytes and sleeps until the average rate is back under
    the limit (a burst of at most ``burst_s`` worth of bytes passes at once). Called
    *before* a frame leaves (``TransmitControl.before_send``), the frame waits for its
    own budget, so the last byte of a transfer leaves no earlier than size / rate; called
    after (``after_send`` alone), the last frame of a transfer escapes its wait and a
    short transfer looks faster than the limit by one frame. ``adjust(n)`` corrects a
    charge made on an estimate (the compressed size is known only after sending) without
    sleeping; the next ``consume`` pays any debt.

    Time slept beyond what was asked (the scheduler wakes late) is credited: the balance
    is carried across the sleep instead of being reset, so the long-run rate converges on
    the limit rather than drifting below it.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        burst_s: float = 0.25,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.burst_s = burst_s
        self.kbps: float | None = None
        self._tokens = 0.0
        self._last = clock()
        self._lock = threading.Lock()
        self.bytes_total = 0
        self.bytes_limited = 0  # bytes sent while a limit was in force
        self.waited_s = 0.0
        self.limited_since: float | None = None

    def set_rate(self, kbps: float | None) -> None:
        with self._lock:
            if kbps != self.kbps:
                self.kbps = kbps
                self._tokens = 0.0
                self._last = self._clock()
                self.limited_since = self._last if kbps else None

    def _refill(self, rate: float) -> None:
        now = self._clock()
        # Time earns at most burst_s worth of budget; a refund (adjust) above that is
        # kept: it was paid for with time already waited.
        earned = min(rate * self.burst_s, self._tokens + (now - self._last) * rate)
        self._tokens = max(self._tokens, earned)
        self._last = now

    def consume(self, n: int) -> float:
        """Charge ``n`` bytes; returns the seconds slept."""
        with self._lock:
            self.bytes_total += n
            if not self.kbps:
                return 0.0
            rate = self.kbps * 1000 / 8
            self._refill(rate)
            self._tokens -= n
            self.bytes_limited += n
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
            if wait > 0:
                # Sleep holding the lock: the other connections to this IP wait too, so
                # the sum of all of them stays under the one limit. The negative balance
                # is kept: the next refill credits the whole time slept, overshoot too.
                self._sleep(wait)
                self.waited_s += wait
            return wait

    def adjust(self, n: int) -> None:
        """Correct an earlier charge by ``n`` bytes (negative: refund); never sleeps."""
        with self._lock:
            self.bytes_total += n
            if not self.kbps:
                return
            self._refill(self.kbps * 1000 / 8)
            self._tokens -= n
            self.bytes_limited += n

    def figures(self) -> dict[str, Any]:
        with self._lock:
            elapsed = self._clock() - self.limited_since if self.limited_since is not None else None
            return {
                "limit_kbps": self.kbps,
                "bytes_total": self.bytes_total,
                "bytes_limited": self.bytes_limited,
                "waited_s": round(self.waited_s, 3),
                "achieved_kbps": (
                    round(self.bytes_limited * 8 / 1000 / elapsed, 1)
                    if elapsed and elapsed > 0
                    else None
                ),
            }

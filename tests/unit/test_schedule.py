"""Transmission schedules, windows, bandwidth limits: pure logic with an injected clock."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from dtake.errors import DtakeError
from dtake.service.schedule import (
    BandwidthEvent,
    BandwidthLimit,
    TokenBucket,
    TransmitSchedule,
)

MB = 1024 * 1024
MON = datetime(2026, 11, 23)  # a Monday


def run(
    s: TransmitSchedule, start: datetime, minutes: int, queued: int = 0, empty: bool = False
) -> list[tuple[datetime, bool]]:
    """Tick once a second-equivalent (here: once a minute) and record changes."""
    out = []
    last = None
    for i in range(minutes):
        now = start + timedelta(minutes=i)
        active = s.tick(now, queued_bytes=queued, queue_empty=empty)
        if active != last:
            out.append((now, active))
            last = active
    return out


def test_window_across_midnight_bounds_start_and_stop() -> None:
    s = TransmitSchedule(enabled=True, start_at=["22:00", "05:00"], window=("21:00", "04:00"))
    s.validate()
    assert s.in_window(MON.replace(hour=23)) and s.in_window(MON.replace(hour=3, minute=59))
    assert not s.in_window(MON.replace(hour=4)) and not s.in_window(MON.replace(hour=20))
    changes = run(s, MON.replace(hour=20), 10 * 60)
    # Starts at 22:00, ends at the window's end at 04:00; the 05:00 start is outside
    # the window and ignored [L5524].
    assert changes == [
        (MON.replace(hour=20), False),
        (MON.replace(hour=22), True),
        (MON.replace(hour=4) + timedelta(days=1), False),
    ]


def test_window_alone_never_starts() -> None:
    with pytest.raises(DtakeError):
        TransmitSchedule(enabled=True, window=("21:00", "04:00")).validate()


def test_start_on_amount_queued_runs_until_queue_empty() -> None:
    s = TransmitSchedule(enabled=True, start_queued_mb=10)
    t = MON.replace(hour=9)
    assert not s.tick(t, queued_bytes=5 * MB, queue_empty=False)
    assert s.tick(t + timedelta(seconds=1), queued_bytes=10 * MB, queue_empty=False)
    # Keeps running below the threshold until the queue is empty.
    assert s.tick(t + timedelta(seconds=2), queued_bytes=1 * MB, queue_empty=False)
    assert not s.tick(t + timedelta(seconds=3), queued_bytes=0, queue_empty=True)
    assert s.reason == "queue empty"


def test_stop_criteria_time_and_duration() -> None:
    s = TransmitSchedule(enabled=True, start_at=["08:00"], stop_at="08:30")
    changes = run(s, MON.replace(hour=7, minute=50), 60, queued=MB)
    assert [c[1] for c in changes] == [False, True, False]
    assert changes[2][0] == MON.replace(hour=8, minute=30)
    s2 = TransmitSchedule(enabled=True, start_at=["08:00"], stop_after_min=15)
    changes = run(s2, MON.replace(hour=7, minute=59), 30, queued=MB)
    assert changes[-1] == (MON.replace(hour=8, minute=15), False)


def test_disabled_schedule_always_transmits_and_keeps_settings() -> None:
    s = TransmitSchedule(enabled=False, start_at=["08:00"], window=("01:00", "02:00"))
    assert s.tick(MON.replace(hour=12), queued_bytes=0, queue_empty=True)
    assert TransmitSchedule.from_dict(s.to_dict()).start_at == ["08:00"]


def test_bandwidth_floor_and_zero() -> None:
    with pytest.raises(DtakeError, match="0 is not allowed"):
        BandwidthLimit("fixed", 0).validate()
    with pytest.raises(DtakeError, match=r"28\.8"):
        BandwidthLimit("fixed", 28.7).validate()
    BandwidthLimit("fixed", 28.8).validate()
    with pytest.raises(DtakeError):
        BandwidthEvent("slow", ["Mon"], "06:00", 10).validate()


def weekly() -> BandwidthLimit:
    return BandwidthLimit(
        "scheduled",
        None,
        [
            BandwidthEvent("workday", ["Mon", "Tue", "Wed", "Thu", "Fri"], "06:00", 512),
            BandwidthEvent("evening", ["Mon", "Tue", "Wed", "Thu"], "20:00", 4096),
            BandwidthEvent("weekend", ["Fri"], "20:00", None),
        ],
    )


def test_weekly_schedule_is_edge_triggered_and_wraps() -> None:
    bw = weekly()
    bw.validate()
    assert bw.current(MON.replace(hour=7)) == (512, "workday")
    assert bw.current(MON.replace(hour=21)) == (4096, "evening")
    # Friday 20:00 "unlimited" lasts through the weekend until Monday 06:00 [L5548].
    assert bw.current(MON + timedelta(days=5, hours=12)) == (None, "weekend")
    assert bw.current(MON.replace(hour=5, minute=59)) == (None, "weekend")  # wraps back


def test_weekly_schedule_xml_round_trip() -> None:
    bw = weekly()
    xml = bw.to_xml()
    assert "<BandwidthSchedule>" in xml and 'limit="Unlimited"' in xml
    events = BandwidthLimit.events_from_xml(xml)
    assert events == bw.events
    with pytest.raises(DtakeError):
        BandwidthLimit.events_from_xml("<Other/>")
    with pytest.raises(DtakeError):
        BandwidthLimit.events_from_xml(
            '<BandwidthSchedule><Event name="x" days="Xyz" start="06:00"/></BandwidthSchedule>'
        )


def test_scheduled_mode_needs_an_existing_schedule() -> None:
    with pytest.raises(DtakeError, match="import one first"):
        BandwidthLimit("scheduled").validate()


def test_token_bucket_accounts_for_the_limit_with_a_fake_clock() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    tb = TokenBucket(clock=lambda: now[0], sleep=sleep)
    tb.set_rate(800)  # 100 kB/s
    for _ in range(100):
        tb.consume(10_000)  # 1 MB in total
    # 1 MB at 100 kB/s: ~10 s of waiting, less the 0.25 s burst allowance.
    assert 9.7 <= sum(slept) <= 10.01
    f = tb.figures()
    assert f["bytes_limited"] == 1_000_000
    assert abs(f["achieved_kbps"] - 800) < 25
    tb.set_rate(None)
    assert tb.consume(10**9) == 0.0


class _FakeTime:
    """A clock whose sleep() oversleeps by ``late`` seconds (a loaded scheduler)."""

    def __init__(self, late: float = 0.0) -> None:
        self.now = 0.0
        self.late = late
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s + self.late


def test_token_bucket_credits_oversleeping_so_the_rate_does_not_drift_low() -> None:
    ft = _FakeTime(late=0.01)  # every sleep wakes 10 ms late
    tb = TokenBucket(clock=ft.clock, sleep=ft.sleep)
    tb.set_rate(8000)  # 1 MB/s
    for _ in range(100):
        tb.consume(100_000)  # 10 MB, each frame waits ~0.1 s and wakes 10 ms late
    achieved = 10_000_000 / ft.now
    # Resetting the balance after each sleep would lose the 10 ms per frame (~9 % low).
    assert achieved >= 0.99 * 1_000_000, achieved
    assert achieved <= 1_000_000 * 1.0 + 1, achieved


def test_token_bucket_charged_before_sending_makes_the_last_frame_wait() -> None:
    ft = _FakeTime()
    tb = TokenBucket(clock=ft.clock, sleep=ft.sleep)
    tb.set_rate(8000)  # 1 MB/s
    sent_at: list[float] = []
    for _ in range(4):
        tb.consume(1_000_000)  # before_send: pay, then the frame leaves
        sent_at.append(ft.now)
    assert sent_at[-1] == pytest.approx(4.0)  # 4 MB fully paid for when the last one leaves
    tb.adjust(-500_000)  # the last frame compressed to half its estimate: a refund
    assert tb.figures()["bytes_limited"] == 3_500_000
    assert tb.consume(500_000) == pytest.approx(0.0, abs=1e-9)  # the refund is spent at once

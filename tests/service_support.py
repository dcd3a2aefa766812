"""Helpers shared by the integration tests that drive real `dtake serve` processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dtake.testing import ServiceProcess, tree_diff


def settle(svc: ServiceProcess, cid: int, timeout: float = 120) -> dict[str, Any]:
    """Connection CID idle (mirror done, nothing queued or unacknowledged)."""
    time.sleep(0.3)  # let inotify deliver the last events before asking for idle
    r: dict[str, Any] = svc.call("wait", con_id=cid, timeout_s=timeout)
    return r


def until(fn: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """FN's first truthy value, polled every 0.1 s; the test fails after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def assert_same(a: str, b: str, **kw: Any) -> None:
    """Trees A and B equal byte for byte, with mode, owner and mtimes (tree_diff)."""
    diff = tree_diff(a, b, **kw)
    assert diff == [], "trees differ:\n" + "\n".join(diff[:30])


def sh(*cmd: str) -> str:
    """Run CMD; its stdout, or an assertion naming the command and its stderr."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


@contextlib.contextmanager
def small_inotify_queue(events: int = 64) -> Iterator[None]:
    """Inotify instances created inside (a service started here: its capture) get a
    kernel queue of EVENTS, so a burst overflows it; the global knob is restored on exit."""
    knob = "/proc/sys/fs/inotify/max_queued_events"
    if not os.access(knob, os.W_OK):
        pytest.fail(f"{knob} is not writable: run the tests as root")
    with open(knob) as fh:
        old = fh.read().strip()
    try:
        with open(knob, "w") as fh:
            fh.write(str(events))  # applies to inotify instances created from now on
        yield
    finally:
        with open(knob, "w") as fh:
            fh.write(old)

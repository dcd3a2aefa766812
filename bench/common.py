"""Shared helpers for bench/: timing, statistics, tables, JSON results, processes.

Nothing here asserts a timing: benchmarks measure, print a table and write JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "Graveyard",
    "Row",
    "RssSampler",
    "cpu_delta",
    "machine_info",
    "percentile",
    "render_table",
    "settle_fs",
    "stop_pid",
    "summary",
    "sync_fs",
    "thread_cpu",
    "timed",
    "write_json",
]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- timing
@contextmanager
def timed(out: list[float]) -> Iterator[None]:
    """``with timed(samples): ...`` appends the elapsed wall time (monotonic seconds)."""
    t = time.monotonic()
    try:
        yield
    finally:
        out.append(time.monotonic() - t)


def sync_fs() -> None:
    """Flush dirty data before a timed run, so no earlier write is paid for inside it."""
    os.sync()


def probe_create_us(parent: str, n: int = 300) -> float:
    """Microseconds per empty-file creation in a new directory under ``parent`` (the
    files stay: deleting them would start the very slowdown this measures)."""
    d = os.path.join(parent, f"probe-{time.time_ns()}")
    os.makedirs(d)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    t = time.perf_counter()
    for i in range(n):
        os.close(os.open(os.path.join(d, str(i)), flags, 0o644))
    return (time.perf_counter() - t) / n * 1e6


def settle_fs(
    parent: str,
    *,
    fast_us: float = 60.0,
    max_wait_s: float = 120.0,
    poll_s: float = 5.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Wait until creating a file is cheap again before a timed many-file run.

    On ext4 without a journal the inode allocator skips, one by one, every inode freed
    in the last 60 s (360 s while its inode-table block is dirty): ``recently_deleted()``
    in fs/ext4/ialloc.c. Replacing files (both tools' temp file + rename frees the old
    inode) or deleting a tree puts the file system in that state, and a file then costs
    100-500 us to create instead of ~10-25 us, for whichever tool comes next. This
    syncs (clean blocks: the 60 s window), probes, and waits while the probe is slow,
    so every tool's timed run starts in the same, steady state. Returns the probe
    figures (recorded with the results)."""
    sync_fs()
    t0 = time.monotonic()
    first = us = probe_create_us(parent)
    while us > fast_us and time.monotonic() - t0 < max_wait_s:
        if log is not None:
            log(f"file creation costs {us:.0f} us (recently freed inodes); waiting")
        time.sleep(poll_s)
        sync_fs()
        us = probe_create_us(parent)
    return {
        "first_us": round(first, 1),
        "us": round(us, 1),
        "waited_s": round(time.monotonic() - t0, 1),
        "settled": us <= fast_us,
    }


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of nothing")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: Sequence[float], ndigits: int = 4) -> dict[str, Any]:
    """Median, min, max and the raw samples."""
    if not values:
        return {"n": 0}
    return {
        "median": round(statistics.median(values), ndigits),
        "min": round(min(values), ndigits),
        "max": round(max(values), ndigits),
        "n": len(values),
        "samples": [round(v, ndigits) for v in values],
    }


# ----------------------------------------------------------------------------- tables
@dataclass
class Row:
    """One line of a comparison table: ``ratio`` > 1 means dtake is better."""

    what: str
    dtake: str
    peer: str
    ratio: float | None
    goal: str
    met: bool | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "dtake": self.dtake,
            "peer": self.peer,
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "goal": self.goal,
            "met": self.met,
            "note": self.note,
        }


def render_table(rows: Sequence[Row], title: str = "") -> str:
    head = ("what", "dtake", "peer", "ratio", "goal", "met?")
    cells = [
        (
            r.what,
            r.dtake,
            r.peer,
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            r.goal,
            "-" if r.met is None else ("yes" if r.met else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    sep = "  "
    lines = [title] if title else []
    lines.append(sep.join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append(sep.join("-" * w for w in widths))
    lines.extend(sep.join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells)
    notes = [f"  {r.what}: {r.note}" for r in rows if r.note]
    if notes:
        lines.append("notes:")
        lines.extend(notes)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- results
def machine_info(path: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if path is not None:
        r = subprocess.run(
            ["stat", "-f", "-c", "%T", path], capture_output=True, text=True, check=False
        )
        info["fs"] = r.stdout.strip()
    return info


def write_json(name_or_path: str, doc: dict[str, Any]) -> str:
    """Write ``bench/results/<name>.json`` (or an explicit ``*.json`` path); returns the path."""
    path = (
        name_or_path
        if name_or_path.endswith(".json")
        else os.path.join(RESULTS_DIR, f"{name_or_path}.json")
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- processes
def stop_pid(proc: subprocess.Popen[Any], *, timeout: float = 10.0) -> None:
    """SIGTERM one process we started (by its PID), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class RssSampler:
    """Samples VmRSS of one PID every ``interval`` s in a thread; also reads VmHWM."""

    pid: int
    interval: float = 0.05
    samples_kib: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def rss_kib(self) -> int | None:
        return _status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int | None:
        return _status_kib(self.pid, "VmHWM")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            v = self.rss_kib()
            if v is not None:
                self.samples_kib.append(v)

    def __enter__(self) -> RssSampler:
        v = self.rss_kib()
        if v is not None:
            self.samples_kib.append(v)
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_kib(self) -> int:
        return max(self.samples_kib, default=0)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread of ``pid``, keyed ``"<comm>/<tid>"``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as fh:
                raw = fh.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[f"{comm}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, threads that ended included
    (``thread_cpu`` sees only the live ones)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            raw = fh.read()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_delta(
    before: dict[str, float], after: dict[str, float], min_s: float = 0.01
) -> dict[str, float]:
    """Per-thread CPU seconds spent between two ``thread_cpu`` snapshots (busy ones only)."""
    d = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in d.items() if v >= min_s), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- trees
class Graveyard:
    """Trees are renamed in here between runs and deleted only at the end.

    On ext4 without a journal, creating files right after a mass delete costs 10-20x
    (baselines.md, "recently_deleted"): a timed run must never follow an ``rm -rf``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        self._n = 0

    def bury(self, tree: str) -> None:
        if os.path.lexists(tree):
            self._n += 1
            os.rename(tree, os.path.join(self.path, f"{self._n:04}-{os.path.basename(tree)}"))

    def empty(self, on_error: Callable[[str], None] | None = None) -> None:
        shutil.rmtree(self.path, ignore_errors=on_error is None)

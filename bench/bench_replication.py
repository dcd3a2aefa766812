"""Replication benchmark (issue 2): dtake vs rsync and lsyncd, side by side, one run, loopback.

    .venv/bin/python -m bench.bench_replication [--quick] [--runs 3] [--dir /var/tmp]
        [--json PATH] [--only big,small,diff,lat] [--profile DIR]

Measured, each as dtake vs its peer on the same data in the same run:

- full mirror of 8 x 128 MiB and of 20,000 x 4 KiB (200 dirs): two real ``dtake serve``
  on 127.0.0.1 (repset create, ``connect --mirror full``, time from connect until the
  source reports the connection idle: mirror Idle, queue empty, everything acknowledged,
  target data OK) vs ``rsync -a SRC/ rsync://127.0.0.1:PORT/mod/DST/`` against an
  ``rsync --daemon --no-detach`` started (and stopped) by PID;
- differences resync after 1 % of the small files changed (200 files rewritten, same
  size, new mtime): a new dtake connection with ``--mirror differences`` to the stale
  target vs a second ``rsync -a``. dtake resyncs from its change journal here (the
  source service kept capturing after the disconnect: docs/resync-journal.md); the same
  resync is then measured again without it (another 1 % changed, the source service
  restarted first, so both trees are walked), for information;
- write-to-target latency at 100 file writes/s (4 KiB files): a writer thread creates the
  files on a schedule, an inotify watch on the target directory sees each one appear under
  its final name (both tools write a temp file and rename it); dtake vs ``lsyncd``
  (``default.rsync``, ``delay = 0``, local target, as in baselines.md section 2);
- memory: RSS of the source ``dtake serve`` during the big mirror vs its queue limit.

Goals (issue 2): both mirrors ratio >= 1.0 (rsync time / dtake time), differences
>= 2.0, p50 latency <= 100 ms. Trees are compared byte for byte after every timed run
(untimed). Timed runs follow a ``sync``; replaced trees go to a graveyard that is emptied
at exit (ext4 without a journal makes file creation slow after a mass delete), and each
many-file run waits until creating a file is cheap again (``settle_fs``: replaced files
free inodes too, and the next 60 s of file creation pay for them, whichever tool runs).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inotify_simple import INotify
from inotify_simple import flags as iflags

from bench.common import (
    Graveyard,
    Row,
    RssSampler,
    cpu_delta,
    machine_info,
    percentile,
    process_cpu,
    render_table,
    settle_fs,
    stop_pid,
    summary,
    sync_fs,
    thread_cpu,
    write_json,
)
from dtake.protocol.auth import generate_key_file
from dtake.testing import ServiceProcess, free_port, tree_digest

MiB = 1024 * 1024
SCENARIOS = ("big", "small", "diff", "lat")
QUEUE_LIMIT_MB = 64  # ServiceProcess default (queue.memory_max_mb)


@dataclass(frozen=True)
class Sizes:
    big_files: int
    big_size: int
    small_dirs: int
    small_per_dir: int
    small_size: int
    changed_fraction: float
    lat_samples: int
    lat_rate: float
    lat_size: int

    @property
    def small_files(self) -> int:
        return self.small_dirs * self.small_per_dir


FULL = Sizes(8, 128 * MiB, 200, 100, 4096, 0.01, 1000, 100.0, 4096)
QUICK = Sizes(2, 16 * MiB, 20, 100, 4096, 0.01, 100, 100.0, 4096)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- datasets
def make_big(root: str, s: Sizes, seed: int = 1) -> None:
    os.makedirs(root)
    rnd = random.Random(seed)
    for i in range(s.big_files):
        with open(os.path.join(root, f"big{i:02}.bin"), "wb") as fh:
            left = s.big_size
            while left:
                n = min(16 * MiB, left)
                fh.write(rnd.randbytes(n))
                left -= n


def make_small(root: str, s: Sizes, seed: int = 2) -> list[str]:
    """The small-file tree; returns the file paths (relative) in creation order."""
    rnd = random.Random(seed)
    out: list[str] = []
    for d in range(s.small_dirs):
        dp = os.path.join(root, f"d{d:03}")
        os.makedirs(dp)
        for f in range(s.small_per_dir):
            rel = f"d{d:03}/f{f:04}"
            with open(os.path.join(root, rel), "wb") as fh:
                fh.write(rnd.randbytes(s.small_size))
            out.append(rel)
    return out


def mutate(root: str, files: list[str], fraction: float, run: int) -> list[str]:
    """Rewrite ``fraction`` of the files: same size, new content, new mtime."""
    n = max(1, round(len(files) * fraction))
    step = len(files) // n
    chosen = [files[(i * step + run) % len(files)] for i in range(n)]
    rnd = random.Random(1000 + run)
    now = time.time_ns()
    for rel in chosen:
        p = os.path.join(root, rel)
        size = os.path.getsize(p)
        with open(p, "r+b") as fh:
            fh.write(rnd.randbytes(size))
        os.utime(p, ns=(now, now + (run + 1) * 1_000_000_000))
    return chosen


def same_tree(expected: dict[str, tuple[Any, ...]], dst: str) -> list[str]:
    got = tree_digest(dst)
    bad = [k for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)]
    return bad[:10]


# ----------------------------------------------------------------------------- peers
class RsyncDaemon:
    """``rsync --daemon --no-detach`` on 127.0.0.1 with one writable module ``mod``."""

    def __init__(self, work: str) -> None:
        self.root = os.path.join(work, "rsyncd")
        self.module = os.path.join(work, "dst")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RsyncDaemon:
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.module, exist_ok=True)
        conf = os.path.join(self.root, "rsyncd.conf")
        with open(conf, "w", encoding="utf-8") as fh:
            fh.write(
                f"pid file = {self.root}/rsyncd.pid\n"
                f"log file = {self.root}/rsyncd.log\n"
                "use chroot = no\nuid = root\ngid = root\nnumeric ids = yes\n"
                f"[mod]\npath = {self.module}\nread only = no\n"
            )
        self.proc = subprocess.Popen(
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                f"--port={self.port}",
                "--address=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsync daemon exited {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsync daemon did not come up")

    def push(self, src: str, name: str) -> float:
        """``rsync -a SRC/ rsync://.../mod/NAME/``; returns the wall time."""
        url = f"rsync://127.0.0.1:{self.port}/mod/{name}/"
        t = time.monotonic()
        subprocess.run(["rsync", "-a", src.rstrip("/") + "/", url], check=True)
        return time.monotonic() - t

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


class Lsyncd:
    """``lsyncd`` (default.rsync, delay = 0) in the foreground, started/stopped by PID."""

    def __init__(self, work: str, src: str, dst: str) -> None:
        self.dir = os.path.join(work, "lsyncd")
        self.src, self.dst = src, dst
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Lsyncd:
        os.makedirs(self.dir, exist_ok=True)
        conf = os.path.join(self.dir, "lsyncd.conf.lua")
        with open(conf, "w", encoding="utf-8") as fh:
            fh.write(
                f'settings {{ nodaemon = true, logfile = "{self.dir}/lsyncd.log" }}\n'
                f'sync {{ default.rsync, source = "{self.src}", target = "{self.dst}", '
                "delay = 0 }\n"
            )
        self.proc = subprocess.Popen(
            ["lsyncd", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


# ----------------------------------------------------------------------------- dtake
class Profiler:
    """Optional ``py-spy record`` (raw collapsed stacks) of one PID for one scenario."""

    def __init__(self, out_dir: str | None) -> None:
        self.out_dir = out_dir
        exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.exe = exe if os.path.exists(exe) else shutil.which("py-spy")
        if out_dir and not self.exe:
            raise SystemExit("--profile needs py-spy (.venv/bin/pip install py-spy)")

    @contextmanager
    def record(self, pids: dict[str, int], name: str) -> Iterator[None]:
        if not self.out_dir or not self.exe:
            yield
            return
        os.makedirs(self.out_dir, exist_ok=True)
        procs = []
        for role, pid in pids.items():
            out = os.path.join(self.out_dir, f"{name}-{role}.txt")
            procs.append(
                subprocess.Popen(
                    [self.exe, "record", "-p", str(pid), "-r", "200", "--threads",
                     "--format", "raw", "-o", out],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        time.sleep(1.0)  # let py-spy attach before the timed part starts
        try:
            yield
        finally:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGINT)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    stop_pid(p)


@dataclass
class DtakePair:
    """A source and a target ``dtake serve`` on loopback, fresh for each run."""

    work: str
    run: int
    a: ServiceProcess = field(init=False)
    b: ServiceProcess = field(init=False)
    last_cpu: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        base = os.path.join(self.work, "dtake", f"run{self.run}")
        os.makedirs(base, exist_ok=True)
        key = os.path.join(base, "authkey")
        generate_key_file(key)
        self.a = ServiceProcess(os.path.join(base, "src"), f"bsrc{self.run}", key)
        self.b = ServiceProcess(os.path.join(base, "dst"), f"bdst{self.run}", key)

    def start(self) -> DtakePair:
        self.a.start()
        self.b.start()
        return self

    def stop(self) -> None:
        for sp in (self.a, self.b):
            try:
                sp.stop()
            except Exception:
                sp.kill9()

    def repset(self, name: str, src: str) -> None:
        self.a.call("repset_create", name=name, rules=[f"{src} inc, rec"], replace=True)

    def connect(self, repset: str, dst: str, mirror: str) -> int:
        r = self.a.call(
            "connect",
            repset=repset,
            host="127.0.0.1",
            port=self.b.port,
            target_path=dst,
            mirror=mirror,
        )
        return int(r["id"])

    def conn_status(self, cid: int) -> dict[str, Any]:
        st = self.a.call("status")
        for c in st["connections"]:
            if c["id"] == cid:
                return dict(c)
        raise RuntimeError(f"connection {cid} vanished")

    def until_idle(self, cid: int, t0: float, timeout: float = 1800.0) -> tuple[float, float]:
        """Poll until the connection looks idle; returns (first idle, confirmed by ``wait``).

        The poll interval grows with the elapsed time (2 ms .. 20 ms), so short runs keep
        their resolution and long ones are not slowed by status calls.
        """
        deadline = t0 + timeout
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"connection {cid} not idle after {timeout}s")
            c = self.conn_status(cid)
            if (
                c["state"] == "Started"
                and c["mirror_status"] == "Idle"
                and c["queued_items"] == 0
                and c["unacked_ops"] == 0
                and c["target_data_state"] == "OK"
            ):
                first = time.monotonic() - t0
                break
            time.sleep(min(0.02, max(0.002, (now - t0) / 50)))
        self.a.call("wait", con_id=cid, timeout_s=timeout)
        return first, time.monotonic() - t0

    def pids(self) -> tuple[int, int]:
        return (self.a.proc.pid if self.a.proc else 0, self.b.proc.pid if self.b.proc else 0)

    def timed_mirror(self, cid_factory: Callable[[], int]) -> tuple[int, float, float]:
        sp, tp = self.pids()
        before = thread_cpu(sp), thread_cpu(tp)
        total = process_cpu(sp), process_cpu(tp)
        t0 = time.monotonic()
        cid = cid_factory()
        first, confirmed = self.until_idle(cid, t0)
        self.last_cpu = {
            "wall_s": round(first, 3),
            # whole processes (a mirror's finished thread is in these, not below)
            "source_s": round(process_cpu(sp) - total[0], 2),
            "target_s": round(process_cpu(tp) - total[1], 2),
            "source_threads_s": cpu_delta(before[0], thread_cpu(sp)),
            "target_threads_s": cpu_delta(before[1], thread_cpu(tp)),
        }
        return cid, first, confirmed


# ----------------------------------------------------------------------------- latency
def measure_latency(
    src: str, dst: str, s: Sizes, *, settle_timeout: float = 30.0
) -> dict[str, Any]:
    """Write ``lat_samples`` files into ``src`` at ``lat_rate``/s; time their arrival in ``dst``.

    Arrival = the final name appears in ``dst`` with its full size (IN_MOVED_TO, or
    IN_CLOSE_WRITE for a tool writing in place; a copy made between the writer's create
    and its write arrives empty and does not count); latency = arrival - writer's close(). Files never seen within
    ``settle_timeout`` after the last write are counted as lost.
    """
    ino = INotify()
    ino.add_watch(dst, iflags.MOVED_TO | iflags.CLOSE_WRITE)
    seen: dict[str, float] = {}
    written: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for ev in ino.read(timeout=100):
                now = time.monotonic()
                if not ev.name.startswith("w") or ev.name in seen:
                    continue
                try:  # complete = final name with the full size (an early read may be empty)
                    if os.stat(os.path.join(dst, ev.name)).st_size == s.lat_size:
                        seen[ev.name] = now
                except FileNotFoundError:
                    pass

    th = threading.Thread(target=watch, name="lat-watch", daemon=True)
    th.start()
    payload = os.urandom(s.lat_size)
    late = 0
    t0 = time.monotonic() + 0.2
    try:
        for i in range(s.lat_samples):
            due = t0 + i / s.lat_rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.005:
                late += 1
            name = f"w{i:06}"
            fd = os.open(os.path.join(src, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)
            written[name] = time.monotonic()
        deadline = time.monotonic() + settle_timeout
        while len(seen) < len(written) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        th.join()
        ino.close()
    lat = [seen[n] - written[n] for n in written if n in seen]
    wrong_size = sum(
        1
        for n in written
        if n in seen
        and (not os.path.exists(os.path.join(dst, n)) or os.path.getsize(os.path.join(dst, n)))
        != s.lat_size
    )
    span = max(written.values()) - min(written.values()) if written else 0.0
    return {
        "samples_s": [round(x, 5) for x in lat],
        "lost": len(written) - len(lat),
        "wrong_size": wrong_size,
        "writer_late": late,
        "achieved_rate": round((len(written) - 1) / span, 1) if span else None,
    }


def wait_for_path(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear in {timeout}s")
        time.sleep(0.01)


# ----------------------------------------------------------------------------- the run
@dataclass
class Results:
    big_rsync: list[float] = field(default_factory=list)
    big_dtake: list[float] = field(default_factory=list)
    big_dtake_confirmed: list[float] = field(default_factory=list)
    small_rsync: list[float] = field(default_factory=list)
    small_dtake: list[float] = field(default_factory=list)
    small_dtake_confirmed: list[float] = field(default_factory=list)
    diff_rsync: list[float] = field(default_factory=list)
    diff_dtake: list[float] = field(default_factory=list)
    diff_dtake_confirmed: list[float] = field(default_factory=list)
    walk_rsync: list[float] = field(default_factory=list)
    walk_dtake: list[float] = field(default_factory=list)
    lat_dtake: list[dict[str, Any]] = field(default_factory=list)
    lat_lsyncd: list[dict[str, Any]] = field(default_factory=list)
    rss_big: list[dict[str, Any]] = field(default_factory=list)
    rss_small: list[dict[str, Any]] = field(default_factory=list)
    conn_stats: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    fs_probes: list[dict[str, Any]] = field(default_factory=list)


class Bench:
    def __init__(self, work: str, sizes: Sizes, scenarios: set[str], profile: str | None) -> None:
        self.work = work
        self.s = sizes
        self.scen = scenarios
        self.src_big = os.path.join(work, "src", "big")
        self.src_small = os.path.join(work, "src", "small")
        self.src_lat = os.path.join(work, "src", "lat")
        self.dst = os.path.join(work, "dst")  # the rsync module root, and dtake's targets
        self.grave = Graveyard(os.path.join(work, "graveyard"))
        self.rsyncd = RsyncDaemon(work)
        self.prof = Profiler(profile)
        self.res = Results()
        self.small_files: list[str] = []
        self.digest_big: dict[str, tuple[Any, ...]] = {}

    def check(self, what: str, expected: dict[str, tuple[Any, ...]], dst: str) -> None:
        bad = same_tree(expected, dst)
        if bad:
            msg = f"{what}: {dst} differs from the source: {bad}"
            log("MISMATCH " + msg)
            self.res.mismatches.append(msg)

    def prepare(self) -> None:
        t = time.monotonic()
        if "big" in self.scen:
            make_big(self.src_big, self.s)
            self.digest_big = tree_digest(self.src_big)
        if self.scen & {"small", "diff"}:
            self.small_files = make_small(self.src_small, self.s)
        os.makedirs(self.src_lat)
        log(f"datasets ready in {time.monotonic() - t:.1f}s under {self.work}")

    # -- one run ---------------------------------------------------------------------
    def run(self, r: int) -> None:
        pair = DtakePair(self.work, r).start()
        rsync_first = r % 2 == 0  # alternate which tool goes first
        try:
            if "big" in self.scen:
                self._big(pair, r, rsync_first)
            if self.scen & {"small", "diff"}:
                self._small_and_diff(pair, r, rsync_first)
            if "lat" in self.scen:
                self._latency(pair, r, rsync_first)
        finally:
            pair.stop()

    def settle(self, what: str) -> None:
        """Before a timed many-file run: wait out ext4's recently-freed-inode slowdown
        (bench.common.settle_fs), and record the file system's state."""
        probe = settle_fs(self.dst, log=lambda m: log(f"{what}: {m}"))
        self.res.fs_probes.append({"before": what, **probe})
        if not probe["settled"]:
            log(f"{what}: still slow after {probe['waited_s']} s ({probe['us']} us a file)")

    def _rsync(self, src: str, name: str) -> float:
        sync_fs()
        return self.rsyncd.push(src, name)

    def _big(self, pair: DtakePair, r: int, rsync_first: bool) -> None:
        name_r, name_d = f"big-rsync-{r}", f"big-dtake-{r}"
        pair.repset("big", self.src_big)
        dst_d = os.path.join(self.dst, name_d)

        def dtake() -> None:
            self.settle(f"run {r}: small dtake")
            src_rss = RssSampler(pair.a.proc.pid if pair.a.proc else 0)
            dst_rss = RssSampler(pair.b.proc.pid if pair.b.proc else 0)
            idle_kib = src_rss.rss_kib() or 0
            pids = {"source": src_rss.pid, "target": dst_rss.pid}
            with self.prof.record(pids, f"big-run{r}"), src_rss, dst_rss:
                cid, first, confirmed = pair.timed_mirror(
                    lambda: pair.connect("big", dst_d, "full")
                )
            self.res.big_dtake.append(first)
            self.res.big_dtake_confirmed.append(confirmed)
            self.res.rss_big.append(
                {
                    "source_idle_kib": idle_kib,
                    "source_peak_kib": src_rss.peak_kib,
                    "source_hwm_kib": src_rss.hwm_kib(),
                    "target_peak_kib": dst_rss.peak_kib,
                    "queue_limit_kib": QUEUE_LIMIT_MB * 1024,
                    "source_samples_kib": src_rss.samples_kib[:: max(1, len(src_rss.samples_kib) // 200)],
                }
            )  # fmt: skip
            self.res.conn_stats.append(
                {"big": pair.conn_status(cid)["stats"], "run": r, "cpu": pair.last_cpu}
            )
            log(f"run {r}: big dtake CPU {_cpu_line(pair.last_cpu)}")
            pair.a.call("disconnect", con_id=cid)
            log(f"run {r}: big dtake {first:.2f}s (confirmed {confirmed:.2f}s)")

        def rsync() -> None:
            t = self._rsync(self.src_big, name_r)
            self.res.big_rsync.append(t)
            log(f"run {r}: big rsync {t:.2f}s")

        for f in (rsync, dtake) if rsync_first else (dtake, rsync):
            f()
        self.check("big rsync", self.digest_big, os.path.join(self.dst, name_r))
        self.check("big dtake", self.digest_big, dst_d)
        # 8 files: deleting them is no mass delete; keeps the disk use at one copy per tool
        for n in (name_r, name_d):
            shutil.rmtree(os.path.join(self.dst, n))

    def _small_and_diff(self, pair: DtakePair, r: int, rsync_first: bool) -> None:
        name_r, name_d = f"small-rsync-{r}", f"small-dtake-{r}"
        dst_r, dst_d = os.path.join(self.dst, name_r), os.path.join(self.dst, name_d)
        pair.repset("small", self.src_small)
        expected = tree_digest(self.src_small)

        def dtake() -> None:
            sync_fs()
            src_rss = RssSampler(pair.a.proc.pid if pair.a.proc else 0)
            pids = {"source": src_rss.pid, "target": pair.b.proc.pid if pair.b.proc else 0}
            with self.prof.record(pids, f"small-run{r}"), src_rss:
                cid, first, confirmed = pair.timed_mirror(
                    lambda: pair.connect("small", dst_d, "full")
                )
            self.res.small_dtake.append(first)
            self.res.small_dtake_confirmed.append(confirmed)
            self.res.rss_small.append({"source_peak_kib": src_rss.peak_kib})
            self.res.conn_stats.append(
                {"small": pair.conn_status(cid)["stats"], "run": r, "cpu": pair.last_cpu}
            )
            log(f"run {r}: small dtake CPU {_cpu_line(pair.last_cpu)}")
            pair.a.call("disconnect", con_id=cid)
            log(f"run {r}: small dtake {first:.2f}s (confirmed {confirmed:.2f}s)")

        def rsync() -> None:
            self.settle(f"run {r}: small rsync")
            t = self._rsync(self.src_small, name_r)
            self.res.small_rsync.append(t)
            log(f"run {r}: small rsync {t:.2f}s")

        for f in (rsync, dtake) if rsync_first else (dtake, rsync):
            f()
        self.check("small rsync", expected, dst_r)
        self.check("small dtake", expected, dst_d)
        if "diff" in self.scen:
            self._resync(pair, r, rsync_first, dst_r, dst_d, walked=False)
            # The same resync without the change journal (docs/resync-journal.md): the
            # source service restarted after the disconnect, so both trees are walked.
            pair.a.stop()
            pair.a.start()
            self._resync(pair, r, rsync_first, dst_r, dst_d, walked=True)
        self.grave.bury(dst_r)
        self.grave.bury(dst_d)

    def _resync(
        self, pair: DtakePair, r: int, rsync_first: bool, dst_r: str, dst_d: str, *, walked: bool
    ) -> None:
        """1 % of the small files changed, then a differences resync by each tool: dtake's
        from its change journal, or (``walked``) by walking both trees."""
        name, d_list, r_list = (
            ("walked diff", self.res.walk_dtake, self.res.walk_rsync)
            if walked
            else ("diff", self.res.diff_dtake, self.res.diff_rsync)
        )
        changed = mutate(self.src_small, self.small_files, self.s.changed_fraction, r + 50 * walked)
        expected = tree_digest(self.src_small)

        def dtake() -> None:
            self.settle(f"run {r}: {name} dtake")
            pids = dict(zip(("source", "target"), pair.pids(), strict=True))
            with self.prof.record(pids, f"{name.replace(' ', '-')}-run{r}"):
                cid, first, confirmed = pair.timed_mirror(
                    lambda: pair.connect("small", dst_d, "differences")
                )
            st = pair.conn_status(cid)
            method = (st.get("resync") or {}).get("method")
            if method != ("walk" if walked else "journal"):
                raise RuntimeError(f"{name}: the resync's method was {st.get('resync')}")
            d_list.append(first)
            if not walked:
                self.res.diff_dtake_confirmed.append(confirmed)
            self.res.conn_stats.append({name: st["stats"], "run": r, "cpu": pair.last_cpu})
            log(f"run {r}: {name} dtake CPU {_cpu_line(pair.last_cpu)}")
            pair.a.call("disconnect", con_id=cid)
            log(f"run {r}: {name} dtake {first:.3f}s ({len(changed)} files changed)")

        def rsync() -> None:
            self.settle(f"run {r}: {name} rsync")
            t = self._rsync(self.src_small, os.path.basename(dst_r))
            r_list.append(t)
            log(f"run {r}: {name} rsync {t:.3f}s")

        for f in (rsync, dtake) if rsync_first else (dtake, rsync):
            f()
        self.check(f"{name} rsync", expected, dst_r)
        self.check(f"{name} dtake", expected, dst_d)

    def _latency(self, pair: DtakePair, r: int, rsync_first: bool) -> None:
        src_d = os.path.join(self.src_lat, f"dtake-{r}")
        src_l = os.path.join(self.src_lat, f"lsyncd-{r}")
        dst_d = os.path.join(self.dst, f"lat-dtake-{r}")
        dst_l = os.path.join(self.dst, f"lat-lsyncd-{r}")
        os.makedirs(src_d)
        os.makedirs(src_l)

        def dtake() -> None:
            pair.repset("lat", src_d)
            cid = pair.connect("lat", dst_d, "full")
            pair.until_idle(cid, time.monotonic())
            sync_fs()
            res = measure_latency(src_d, dst_d, self.s)
            pair.until_idle(cid, time.monotonic())
            self.res.lat_dtake.append(res)
            pair.a.call("disconnect", con_id=cid)
            log(f"run {r}: latency dtake {_lat_line(res)}")

        def lsyncd() -> None:
            os.makedirs(dst_l)
            ls = Lsyncd(self.work, src_l, dst_l).start()
            try:
                probe = os.path.join(src_l, "probe")
                with open(probe, "w", encoding="ascii") as fh:
                    fh.write("x")
                wait_for_path(os.path.join(dst_l, "probe"))  # startup sync done, watching
                time.sleep(0.5)
                sync_fs()
                res = measure_latency(src_l, dst_l, self.s)
            finally:
                ls.stop()
            self.res.lat_lsyncd.append(res)
            log(f"run {r}: latency lsyncd {_lat_line(res)}")

        for f in (lsyncd, dtake) if rsync_first else (dtake, lsyncd):
            f()
        for d in (dst_d, dst_l, src_d, src_l):
            self.grave.bury(d)


def _cpu_line(c: dict[str, Any]) -> str:
    src, dst = c["source_threads_s"], c["target_threads_s"]

    def top(d: dict[str, float]) -> str:
        return ", ".join(f"{v:.2f}" for v in list(d.values())[:3])

    return (
        f"source {c['source_s']:.2f} s (live threads {top(src)}), "
        f"target {c['target_s']:.2f} s (live threads {top(dst)}) in {c['wall_s']:.2f} s wall"
    )


def _lat_line(res: dict[str, Any]) -> str:
    xs = res["samples_s"]
    if not xs:
        return f"no samples (lost {res['lost']})"
    return (
        f"p50 {percentile(xs, 50) * 1000:.1f} ms, p99 {percentile(xs, 99) * 1000:.1f} ms, "
        f"lost {res['lost']}, {res['achieved_rate']} writes/s"
    )


# ----------------------------------------------------------------------------- report
def _med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def build_rows(res: Results, s: Sizes) -> list[Row]:
    rows: list[Row] = []

    def timing(
        what: str, d: list[float], p: list[float], goal: float | None, unit: str, work: float
    ) -> None:
        if not d or not p:
            return
        md, mp = _med(d), _med(p)
        ratio = mp / md if md else None
        rows.append(
            Row(
                what,
                f"{md:.2f} s ({work / md:,.0f} {unit})",
                f"{mp:.2f} s ({work / mp:,.0f} {unit})",
                ratio,
                "(info)" if goal is None else f">= {goal:.1f}",
                None if ratio is None or goal is None else ratio >= goal,
                f"median of {len(d)}; dtake {min(d):.2f}-{max(d):.2f} s, "
                f"rsync {min(p):.2f}-{max(p):.2f} s",
            )
        )  # fmt: skip

    big_mb = s.big_files * s.big_size / 1e6
    timing(
        f"full mirror {s.big_files} x {s.big_size // MiB} MiB",
        res.big_dtake,
        res.big_rsync,
        1.0,
        "MB/s",
        big_mb,
    )
    timing(f"full mirror {s.small_files:,} x {s.small_size // 1024} KiB", res.small_dtake, res.small_rsync, 1.0, "files/s", s.small_files)  # fmt: skip
    n_changed = max(1, round(s.small_files * s.changed_fraction))
    timing(f"differences resync, {n_changed} changed", res.diff_dtake, res.diff_rsync, 2.0, "files scanned/s", s.small_files)  # fmt: skip
    timing("same, walked (no journal: source restarted)", res.walk_dtake, res.walk_rsync, None, "files scanned/s", s.small_files)  # fmt: skip
    if res.lat_dtake and res.lat_lsyncd:
        d = [x for run in res.lat_dtake for x in run["samples_s"]]
        p = [x for run in res.lat_lsyncd for x in run["samples_s"]]
        lost_d = sum(run["lost"] for run in res.lat_dtake)
        lost_p = sum(run["lost"] for run in res.lat_lsyncd)
        if d and p:
            d50, p50 = percentile(d, 50), percentile(p, 50)
            d99, p99 = percentile(d, 99), percentile(p, 99)
            note = (
                f"{len(d)} / {len(p)} samples at {s.lat_rate:.0f} writes/s; lost {lost_d} / {lost_p}; "
                "lsyncd writes to a local dir (no TCP)"
            )  # fmt: skip
            rows.append(Row(f"latency p50 @ {s.lat_rate:.0f}/s vs lsyncd", f"{d50 * 1000:.1f} ms", f"{p50 * 1000:.1f} ms", p50 / d50 if d50 else None, "dtake <= 100 ms", d50 <= 0.1 and lost_d == 0, note))  # fmt: skip
            rows.append(Row(f"latency p99 @ {s.lat_rate:.0f}/s vs lsyncd", f"{d99 * 1000:.1f} ms", f"{p99 * 1000:.1f} ms", p99 / d99 if d99 else None, "(info)", None))  # fmt: skip
    if res.rss_big:
        peak = _med([x["source_peak_kib"] for x in res.rss_big]) / 1024
        idle = _med([x["source_idle_kib"] for x in res.rss_big]) / 1024
        rows.append(
            Row(
                "source RSS during big mirror",
                f"peak {peak:.0f} MiB (idle {idle:.0f})",
                f"queue limit {QUEUE_LIMIT_MB} MiB",
                (peak - idle) / QUEUE_LIMIT_MB,
                "growth <= limit",
                peak - idle <= QUEUE_LIMIT_MB,
                "ratio = (peak - idle) / queue limit; lower is better",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_replication", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="small datasets (smoke run)")
    p.add_argument("--runs", type=int, default=3, help="median of N runs (default 3)")
    p.add_argument("--dir", default="/var/tmp", help="parent of the work dir (not tmpfs)")
    p.add_argument("--json", default=None, help="default bench/results/replication.json")
    p.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}"
    )
    p.add_argument("--profile", default=None, help="py-spy raw stacks of the dtake runs here")
    p.add_argument("--keep", action="store_true", help="keep the work dir (debugging)")
    a = p.parse_args(argv)
    scen = {x.strip() for x in a.only.split(",") if x.strip()}
    if scen - set(SCENARIOS):
        p.error(f"unknown scenario(s): {', '.join(sorted(scen - set(SCENARIOS)))}")
    for tool in ("rsync", "lsyncd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (make deps)")
    sizes = QUICK if a.quick else FULL
    work = tempfile.mkdtemp(prefix="dtake-bench-repl-", dir=a.dir)
    bench = Bench(work, sizes, scen, a.profile)
    info = machine_info(work)
    started = time.time()
    try:
        bench.rsyncd.start()
        bench.prepare()
        for r in range(a.runs):
            bench.run(r)
    finally:
        bench.rsyncd.stop()
        if a.keep:
            log(f"work dir kept: {work}")
        else:
            t = time.monotonic()
            shutil.rmtree(work, ignore_errors=True)
            log(f"work dir removed in {time.monotonic() - t:.1f}s")
    res = bench.res
    rows = build_rows(res, sizes)
    title = (
        f"replication benchmark ({'quick' if a.quick else 'full'}, {a.runs} run(s), "
        f"{info['cpus']} CPUs, load {info['loadavg_at_start']}, fs {info.get('fs')})"
    )
    print(render_table(rows, title))
    if res.fs_probes:
        us = [p["us"] for p in res.fs_probes]
        waited = sum(p["waited_s"] for p in res.fs_probes)
        print(
            f"file creation before the many-file runs: {min(us):.0f}-{max(us):.0f} us a file "
            f"(waited {waited:.0f} s in all for recently freed inodes: bench.common.settle_fs)"
        )
    if res.mismatches:
        print("TREES DIFFER:\n  " + "\n  ".join(res.mismatches))
    doc = {
        "bench": "replication",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": "python -m bench.bench_replication " + " ".join(argv or sys.argv[1:]),
        "machine": info,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "sizes": sizes.__dict__,
        "runs": a.runs,
        "table": [r.to_dict() for r in rows],
        "results": {
            "full_mirror_big_s": {
                "dtake": summary(res.big_dtake),
                "dtake_wait_confirmed": summary(res.big_dtake_confirmed),
                "rsync": summary(res.big_rsync),
            },
            "full_mirror_small_s": {
                "dtake": summary(res.small_dtake),
                "dtake_wait_confirmed": summary(res.small_dtake_confirmed),
                "rsync": summary(res.small_rsync),
            },
            "differences_s": {
                "dtake": summary(res.diff_dtake),
                "dtake_wait_confirmed": summary(res.diff_dtake_confirmed),
                "rsync": summary(res.diff_rsync),
            },
            "differences_walked_s": {
                "dtake": summary(res.walk_dtake),
                "rsync": summary(res.walk_rsync),
            },
            "latency": {"dtake": res.lat_dtake, "lsyncd": res.lat_lsyncd},
            "rss_big": res.rss_big,
            "rss_small": res.rss_small,
            "connection_stats": res.conn_stats,
            "fs_probes": res.fs_probes,
        },
        "mismatches": res.mismatches,
    }
    path = write_json(a.json or "replication", doc)
    print(f"written {path}")
    return 1 if res.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())

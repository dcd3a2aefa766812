"""Capture throughput: can one reader thread keep up with a creation burst?

Scenarios (each on a fresh directory, reader = one ``InotifyCapture`` read loop):

- ``burst``: a separate writer process creates N files (4 KiB each, so CREATE, MODIFY,
  CLOSE_WRITE per file) in 200 pre-existing directories while we read continuously, at
  the default ``fs.inotify.max_queued_events`` (16384). Pass = every file reported and
  no OVERFLOW.
- ``burst_newdirs``: the same, but the writer also creates the 200 directories, so the
  new-directory rescan path is exercised under load.
- ``drain``: a backlog of events (below the queue limit) is created without reading,
  then drained: the pure parse/convert rate of ``read()``.

Usage: ``.venv/bin/python bench/bench_capture.py [--files 20000] [--dir /path]``.
Prints a table and writes ``bench/results/capture.json``. Directories are removed at the
end (see reference/baselines.md: mass deletes slow later creates on the root fs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dtake.capture import EventKind, InotifyCapture

RESULTS = Path(__file__).resolve().parent / "results" / "capture.json"
NDIRS = 200

WRITER = r"""
import os, sys
root, n, ndirs, mkdirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
data = b"x" * 4096
if mkdirs:
    for d in range(ndirs):
        os.mkdir(f"{root}/d{d:03d}")
for i in range(n):
    fd = os.open(f"{root}/d{i % ndirs:03d}/f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    os.close(fd)
"""


def _sysctl(name: str) -> int:
    return int(Path(f"/proc/sys/fs/inotify/{name}").read_text())


def burst(base: Path, n: int, *, mkdirs: bool) -> dict[str, object]:
    root = base / ("burst_newdirs" if mkdirs else "burst")
    root.mkdir()
    if not mkdirs:
        for d in range(NDIRS):
            (root / f"d{d:03d}").mkdir()
    expected = {f"{root}/d{i % NDIRS:03d}/f{i:06d}" for i in range(n)}
    seen: set[str] = set()
    events = overflows = 0
    with InotifyCapture() as cap:
        cap.add_root(str(root))
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(n), str(NDIRS), "1" if mkdirs else "0"]
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            batch = cap.read(timeout=0.2)
            events += len(batch)
            for e in batch:
                if e.kind is EventKind.OVERFLOW:
                    overflows += 1
                elif e.kind is EventKind.CREATED:
                    seen.add(e.path)
            if writer.poll() is not None and not batch and seen >= expected:
                break
            if writer.poll() is not None and not batch and overflows:
                break
        writer_rc = writer.wait()
        elapsed = time.perf_counter() - t0
        cpu = time.thread_time() - cpu0
    lost = len(expected - seen)
    return {
        "files": n,
        "events": events,
        "seconds": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "files_per_s": round(n / elapsed),
        # CPU the reader thread used: events per CPU-second is its capacity; the
        # wall-clock rate above is bounded by the writer.
        "reader_cpu_s": round(cpu, 3),
        "reader_events_per_cpu_s": round(events / cpu) if cpu else None,
        "lost_files": lost,
        "overflows": overflows,
        "writer_rc": writer_rc,
        "ok": lost == 0 and overflows == 0 and writer_rc == 0,
    }


def drain(base: Path, n: int) -> dict[str, object]:
    root = base / "drain"
    root.mkdir()
    with InotifyCapture() as cap:
        cap.add_root(str(root))
        for i in range(n):  # CREATE + CLOSE_WRITE per file
            os.close(os.open(root / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
        t0 = time.perf_counter()
        got: list[object] = []
        while True:
            batch = cap.read(timeout=0)
            if not batch:
                break
            got.extend(batch)
        elapsed = time.perf_counter() - t0
    overflows = sum(1 for e in got if getattr(e, "kind", None) is EventKind.OVERFLOW)
    return {
        "events": len(got),
        "seconds": round(elapsed, 4),
        "events_per_s": round(len(got) / elapsed) if elapsed else None,
        "overflows": overflows,
        "ok": len(got) == 2 * n and overflows == 0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--dir", default=None, help="parent directory for the test trees")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dtake-bench-capture-", dir=args.dir))
    try:
        limit = _sysctl("max_queued_events")
        results = {
            "burst": burst(base, args.files, mkdirs=False),
            "burst_newdirs": burst(base, args.files, mkdirs=True),
            "drain": drain(base, min(args.files, (limit - 100) // 2)),
        }
        fs = subprocess.run(
            ["stat", "-f", "-c", "%T", str(base)], capture_output=True, text=True, check=False
        ).stdout.strip()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    doc = {
        "bench": "capture",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "fs": fs,
            "max_queued_events": limit,
            "max_user_watches": _sysctl("max_user_watches"),
        },
        "results": results,
    }
    print(
        f"{'scenario':<15} {'events':>8} {'seconds':>8} {'events/s':>10} "
        f"{'ev/cpu-s':>10} {'lost':>5} {'ovf':>4} ok"
    )
    for name, r in results.items():
        print(
            f"{name:<15} {r['events']:>8} {r['seconds']:>8} {r['events_per_s']!s:>10} "
            f"{r.get('reader_events_per_cpu_s', '-')!s:>10} {r.get('lost_files', 0)!s:>5} {r['overflows']!s:>4} {r['ok']}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

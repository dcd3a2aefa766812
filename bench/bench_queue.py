"""Source queue: daemon memory vs QMemoryBufferMax, disk spill and drain rate.

For each memory limit, a source service queues changes to N new files while its target
is down (so the queue spills to disk), and we read the daemon's RSS (VmRSS, VmHWM)
before and after; then the target comes back and we time the drain until the trees are
identical. Not a test: figures only.

Issue 5's goal: daemon memory stays within the queue limit plus a small fixed overhead.
The service accounts queued items and in-flight ops against ``memory_max_mb``
(``queue.accounted_peak_bytes`` in the status); the table shows that figure, the RSS
growth of the daemon over its idle RSS while the queue is full, and whether the growth
stays within the limit plus ``FIXED_OVERHEAD_MB`` (what is not counted per item: the
inotify read buffer, up to 4 MiB, the journal reader's 256 KiB buffer, the disk
queue's 128 KiB Bloom filter, one batch being encoded, and CPython's allocator keeping
freed arenas).

    .venv/bin/python bench/bench_queue.py [--files 60000] [--limits 1,8,64]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_replication import Profiler
from bench.common import cpu_delta, thread_cpu
from dtake.protocol.auth import generate_key_file
from dtake.testing import ServiceProcess, tree_diff

FIXED_OVERHEAD_MB = 16.0  # stated bound: RSS growth <= limit + this


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def status(svc: ServiceProcess) -> dict[str, Any]:
    return dict(svc.call("status")["connections"][0])


def one(
    root: str, key: str, mem_mb: float, files: int, profile: str | None = None
) -> dict[str, Any]:
    src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
    os.makedirs(src)
    a = ServiceProcess(
        os.path.join(root, "a"),
        "a",
        key,
        extra={
            "queue": {
                "memory_max_mb": mem_mb,
                "disk_folder": os.path.join(root, "a", "state", "queue"),
            }
        },
    ).start()
    b = ServiceProcess(os.path.join(root, "b"), "b", key).start()
    try:
        a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
        cid = a.call("connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst)["id"]
        a.call("wait", con_id=cid, timeout_s=60)
        assert a.proc is not None
        base = rss_kb(a.proc.pid)
        b.stop()
        rnd = random.Random(1)
        for i in range(files):
            d = os.path.join(src, f"d{i % 100:03}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"f{i:07}"), "wb") as fh:
                fh.write(rnd.randbytes(64))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            q = status(a)["queue"]
            if q["memory_items"] + q["disk_items"] >= files:
                break
            time.sleep(0.5)
        time.sleep(1)
        q = status(a)["queue"]
        full = rss_kb(a.proc.pid)
        t0 = time.monotonic()
        b.start()
        assert b.proc is not None
        pids = {"source": a.proc.pid, "target": b.proc.pid}
        before = {k: thread_cpu(p) for k, p in pids.items()}
        with Profiler(profile).record(pids, f"drain-{mem_mb:g}MB"):
            a.call("wait", con_id=cid, timeout_s=600)
        drain = time.monotonic() - t0
        cpu = {k: sum(cpu_delta(before[k], thread_cpu(p)).values()) for k, p in pids.items()}
        same = tree_diff(src, dst) == []
        ids = [int(e["id"]) for e in a.call("events", limit=5000)]
        return {
            "memory_max_mb": mem_mb,
            "files": files,
            "memory_items": q["memory_items"],
            "disk_items": q["disk_items"],
            "log_bytes": q["log_bytes"],
            "accounted_peak_mb": q.get("accounted_peak_bytes", 0) / 1024 / 1024,
            "rss_idle_mb": base["VmRSS"] / 1024,
            "rss_queued_mb": full["VmRSS"] / 1024,
            "rss_growth_mb": (full["VmRSS"] - base["VmRSS"]) / 1024,
            "drain_s": drain,
            "drain_files_per_s": files / drain,
            "drain_cpu_s": cpu,
            "identical": same,
            "overflows": ids.count(51001),  # inotify overflowed: a difference mirror
            "remirrors": status(a)["stats"]["remirrors"],
        }
    finally:
        a.stop()
        b.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=60000)
    ap.add_argument("--limits", default="1,8,64", help="memory limits in MB")
    ap.add_argument("--profile", help="py-spy the drain of both services into DIR")
    args = ap.parse_args()
    top = tempfile.mkdtemp(prefix="bench-queue-")
    key = os.path.join(top, "key")
    generate_key_file(key)
    try:
        print(f"fixed overhead allowed: {FIXED_OVERHEAD_MB:g} MB (RSS growth <= limit + it)")
        print(
            f"{'mem MB':>6} {'in mem':>7} {'on disk':>8} {'logs MB':>8} {'acct peak':>9} "
            f"{'RSS idle':>9} {'RSS queued':>10} {'growth':>7} {'bound':>6} {'drain s':>8} "
            f"{'files/s':>8} same"
        )
        for lim in (float(x) for x in args.limits.split(",")):
            r = one(tempfile.mkdtemp(dir=top), key, lim, args.files, args.profile)
            within = r["rss_growth_mb"] <= lim + FIXED_OVERHEAD_MB
            print(
                f"{r['memory_max_mb']:>6g} {r['memory_items']:>7} {r['disk_items']:>8} "
                f"{r['log_bytes'] / 1e6:>8.1f} {r['accounted_peak_mb']:>9.2f} "
                f"{r['rss_idle_mb']:>9.1f} {r['rss_queued_mb']:>10.1f} "
                f"{r['rss_growth_mb']:>7.1f} {'ok' if within else 'OVER':>6} "
                f"{r['drain_s']:>8.1f} {r['drain_files_per_s']:>8.0f} {r['identical']}  "
                f"overflows {r['overflows']}  drain CPU source "
                f"{r['drain_cpu_s']['source']:.2f} s, target {r['drain_cpu_s']['target']:.2f} s"
            )
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()

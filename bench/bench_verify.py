"""Verification benchmark (issue 5): ``dtake verify`` vs ``rsync -an --checksum``, same trees.

    .venv/bin/python -m bench.bench_verify [--quick] [--runs 3] [--dir /var/tmp] [--json PATH]

Two real ``dtake serve`` on 127.0.0.1 (``dtake.testing.ServiceProcess``); the source tree
is mirrored to the target once (untimed), then a few files are changed on the target
behind dtake's back (same size, other content; and one with another mtime) so there is
something to find. Then, alternating which goes first:

- ``verify --checksum`` (block hashes of every regular file on both sides) vs
  ``rsync -an --checksum --itemize-changes SRC/ DST/`` (whole-file checksums on both
  sides, dry run, local);
- ``verify`` by attributes (size, mtime, mode, owner) vs ``rsync -an --itemize-changes``.

Time is wall clock around the control call (``verify`` returns when the comparison is
done and its log is written) and around the rsync process; CPU time is user + system
of both ``dtake serve`` processes (from /proc, whatever else they do meanwhile: idle
here) and of rsync with its children (its sender, generator and receiver). Both read the trees from the
page cache (the trees were just written and are read every run; no cache is dropped, as
other work shares the machine). Each tool must find the planted differences; a tool
that misses one is reported. Goal: dtake faster than rsync (ratio = rsync / dtake >= 1).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_transmit import Pair, log
from bench.common import Row, machine_info, render_table, summary, write_json
from dtake.protocol.auth import generate_key_file

MiB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    dirs: int
    files_per_dir: int
    small: int  # bytes of each small file
    big_files: int
    big_size: int
    changed: int  # files changed on the target behind dtake's back


FULL = Sizes(100, 100, 8192, 8, 64 * MiB, 20)
QUICK = Sizes(10, 100, 8192, 2, 8 * MiB, 5)


def make_tree(root: str, s: Sizes, seed: int = 3) -> list[str]:
    rnd = random.Random(seed)
    out: list[str] = []
    for d in range(s.dirs):
        os.makedirs(os.path.join(root, f"d{d:03}"))
        for f in range(s.files_per_dir):
            rel = f"d{d:03}/f{f:04}"
            with open(os.path.join(root, rel), "wb") as fh:
                fh.write(rnd.randbytes(rnd.randint(s.small // 2, s.small * 3 // 2)))
            out.append(rel)
    os.makedirs(os.path.join(root, "big"))
    for i in range(s.big_files):
        rel = f"big/b{i:02}.bin"
        with open(os.path.join(root, rel), "wb") as fh:
            for _ in range(s.big_size // (4 * MiB)):
                fh.write(rnd.randbytes(4 * MiB))
        out.append(rel)
    return out


def plant(dst: str, files: list[str], n: int) -> tuple[set[str], str]:
    """Change ``n`` target files in place, same size and mtime (only a checksum sees
    them), and one more with a new mtime (attributes see it). Returns both."""
    rnd = random.Random(99)
    chosen = rnd.sample(files[:-1], n)
    for rel in chosen:
        p = os.path.join(dst, rel)
        st = os.stat(p)
        with open(p, "r+b") as fh:
            fh.seek(st.st_size // 2)
            fh.write(b"\xff\x00dtake-bench")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    touched = files[-1]
    os.utime(os.path.join(dst, touched), (time.time() - 3600, time.time() - 3600))
    return set(chosen), touched


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def rsync_dry(src: str, dst: str, *, checksum: bool) -> tuple[float, set[str], float]:
    cmd = ["rsync", "-an", "--itemize-changes", src.rstrip("/") + "/", dst.rstrip("/") + "/"]
    if checksum:
        cmd.insert(2, "--checksum")
    c = children_cpu()
    t = time.monotonic()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    secs = time.monotonic() - t
    cpu = children_cpu() - c
    # ">fc.t...... path": a file that would be sent (content differs); ".f..t......
    # path": only its attributes would be updated (with --checksum, a new mtime alone).
    found = {ln.split(" ", 1)[1] for ln in out.splitlines() if ln[:2] in (">f", ".f")}
    return secs, found, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_verify", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="small tree (smoke run)")
    p.add_argument("--runs", type=int, default=3, help="median of N runs (default 3)")
    p.add_argument("--dir", default="/var/tmp", help="parent of the work dir (not tmpfs)")
    p.add_argument("--json", default=None, help="default bench/results/verify.json")
    a = p.parse_args(argv)
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is not installed (make deps)")
    s = QUICK if a.quick else FULL
    work = tempfile.mkdtemp(prefix="dtake-bench-verify-", dir=a.dir)
    key = os.path.join(work, "authkey")
    generate_key_file(key)
    info = machine_info(work)
    started = time.time()
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    samples: dict[str, list[float]] = {k: [] for k in ("dc", "rc", "da", "ra")}
    cpus: dict[str, list[float]] = {k: [] for k in ("dc", "rc", "da", "ra")}
    misses: list[str] = []
    verify_out: list[dict[str, Any]] = []
    try:
        files = make_tree(src, s)
        n_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in files)
        log(f"tree: {len(files)} files, {n_bytes / MiB:.0f} MiB")
        with Pair(os.path.join(work, "svc"), key) as pair:
            cid = pair.connect(src, dst)
            pair.until_idle(cid, time.monotonic())
            changed, touched = plant(dst, files, s.changed)
            for r in range(a.runs):

                def dtake(r: int, checksum: bool) -> None:
                    pids = [sp.proc.pid for sp in (pair.a, pair.b) if sp.proc is not None]
                    c = sum(proc_cpu(p) for p in pids)
                    t = time.monotonic()
                    res = pair.a.call("verify", con_id=cid, remirror=False, checksum=checksum)
                    secs = time.monotonic() - t
                    samples["dc" if checksum else "da"].append(secs)
                    cpus["dc" if checksum else "da"].append(sum(proc_cpu(p) for p in pids) - c)
                    found = {d["path"] for d in res["differences"]}
                    want = changed | {touched} if checksum else {touched}
                    if not want <= found:
                        misses.append(
                            f"dtake checksum={checksum} missed {sorted(want - found)[:3]}"
                        )
                    verify_out.append({k: v for k, v in res.items() if k != "differences"})
                    log(
                        f"run {r}: dtake verify checksum={checksum} {secs:.2f} s, {len(found)} found"
                    )

                def rsync(r: int, checksum: bool) -> None:
                    secs, found, cpu = rsync_dry(src, dst, checksum=checksum)
                    samples["rc" if checksum else "ra"].append(secs)
                    cpus["rc" if checksum else "ra"].append(cpu)
                    want = changed | {touched} if checksum else {touched}
                    if not want <= found:
                        misses.append(
                            f"rsync checksum={checksum} missed {sorted(want - found)[:3]}"
                        )
                    log(f"run {r}: rsync -an checksum={checksum} {secs:.2f} s, {len(found)} found")

                order = (dtake, rsync) if r % 2 == 0 else (rsync, dtake)
                for checksum in (True, False):
                    for fn in order:
                        fn(r, checksum)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: float(statistics.median(v)) for k, v in samples.items() if v}
    cpu_med = {k: float(statistics.median(v)) for k, v in cpus.items() if v}
    rows = []
    for what, d, r_, goal in (
        ("verify --checksum vs rsync -an --checksum", "dc", "rc", True),
        ("verify (attributes) vs rsync -an", "da", "ra", False),
    ):
        if d in med and r_ in med:
            ratio = med[r_] / med[d]
            rows.append(
                Row(
                    what,
                    f"{med[d]:.2f} s ({n_bytes / 1e6 / med[d]:,.0f} MB/s)",
                    f"{med[r_]:.2f} s ({n_bytes / 1e6 / med[r_]:,.0f} MB/s)",
                    ratio,
                    ">= 1.0" if goal else "(info)",
                    ratio >= 1.0 if goal else None,
                    f"median of {len(samples[d])}; dtake {min(samples[d]):.2f}-"
                    f"{max(samples[d]):.2f} s, rsync {min(samples[r_]):.2f}-"
                    f"{max(samples[r_]):.2f} s; CPU (user+sys, median) dtake "
                    f"{cpu_med[d]:.2f} s (both services), rsync {cpu_med[r_]:.2f} s; "
                    f"{len(files):,} files, {n_bytes / MiB:.0f} MiB",
                )
            )
    title = (
        f"verification benchmark ({'quick' if a.quick else 'full'}, {a.runs} run(s), "
        f"{info['cpus']} CPUs, load {info['loadavg_at_start']}, fs {info.get('fs')})"
    )
    print(render_table(rows, title))
    if misses:
        print("MISSED DIFFERENCES:\n  " + "\n  ".join(misses))
    doc = {
        "bench": "verify",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": "python -m bench.bench_verify " + " ".join(argv or sys.argv[1:]),
        "machine": info,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "sizes": s.__dict__,
        "table": [r.to_dict() for r in rows],
        "results": {
            "dtake_checksum_s": summary(samples["dc"]),
            "rsync_checksum_s": summary(samples["rc"]),
            "dtake_attributes_s": summary(samples["da"]),
            "rsync_attributes_s": summary(samples["ra"]),
            "cpu_s": {k: summary(v) for k, v in cpus.items()},
            "verify_results": verify_out,
        },
        "misses": misses,
    }
    path = write_json(a.json or "verify", doc)
    print(f"written {path}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())

"""Restore benchmark: the one-pass ``dtake restore ID`` (pulled by the source) vs the
restoration connection ``dtake restore connect`` (pushed by the target, then replicating)
bringing back a source that lost its whole tree [L4674-4800].

    .venv/bin/python -m bench.bench_restore [--quick] [--runs 3] [--dir /var/tmp] [--json PATH]

Per run, two fresh ``dtake serve`` on 127.0.0.1: the tree is mirrored source -> target
(untimed), the source service is killed, the target's copy set to Restore Required (a
failover), the source tree moved aside (lost), the source service started again. Then
the timed part: ``restore`` (until the call returns) or ``restore_connect`` + ``wait``
(until the restoration connection is idle: Mirror Status Idle, nothing queued or
unacknowledged). Runs alternate which method goes first. CPU is user+sys of both
service processes over the timed part (/proc/PID/stat). Each run checks the restored
tree byte for byte.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_info, write_json
from dtake.protocol.auth import generate_key_file
from dtake.testing import ServiceProcess, tree_diff

MiB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")


def make_tree(root: str, *, dirs: int, per_dir: int, small: int, big: int, big_size: int) -> int:
    rnd = random.Random(5)
    total = 0
    for d in range(dirs):
        p = os.path.join(root, f"d{d:03}")
        os.makedirs(p, exist_ok=True)
        for f in range(per_dir):
            data = rnd.randbytes(small)
            with open(os.path.join(p, f"f{f:04}.dat"), "wb") as fh:
                fh.write(data)
            total += small
    for i in range(big):
        with open(os.path.join(root, f"big{i}.bin"), "wb") as fh:
            for _ in range(big_size // MiB):
                fh.write(rnd.randbytes(MiB))
        total += big_size
    return total


def cpu_s(pids: list[int]) -> float:
    out = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        out += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return out


def one_run(base: str, key: str, method: str, tree: str) -> dict[str, Any]:
    src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
    shutil.copytree(tree, src)
    a = ServiceProcess(os.path.join(base, "svc-a"), "a", key).start()
    b = ServiceProcess(os.path.join(base, "svc-b"), "b", key).start()
    try:
        a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
        cid = a.connect_to(b, "rs", dst, mirror="full")
        a.call("wait", con_id=cid, timeout_s=600)
        a.kill9()
        b.call("data_state_set", target=dst, state="Restore Required", reason="failover")
        os.rename(src, os.path.join(base, "lost"))
        os.makedirs(src)
        a.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c = a.call("status")["connections"][0]
            if c["target_data_state"] == "Restore Required" and c["connected_since"]:
                break
            time.sleep(0.1)
        pids = [p.proc.pid for p in (a, b) if p.proc is not None]
        c0, t0 = cpu_s(pids), time.perf_counter()
        if method == "one-pass":
            a.call("restore", con_id=cid, mode="full")
        else:
            rid = int(b.call("restore_connect", source=f"127.0.0.1:{a.port}", repset="rs")["id"])
            b.call("wait", con_id=rid, timeout_s=600)
        wall, cpu = time.perf_counter() - t0, cpu_s(pids) - c0
        diff = tree_diff(dst, src)
        return {"method": method, "wall_s": wall, "cpu_s": cpu, "ok": diff == []}
    finally:
        for sp in (a, b):
            try:
                sp.stop()
            except Exception:
                sp.kill9()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json", default="bench_restore")
    args = ap.parse_args(argv)
    sizes = (
        {"dirs": 5, "per_dir": 100, "small": 8192, "big": 1, "big_size": 8 * MiB}
        if args.quick
        else {"dirs": 20, "per_dir": 100, "small": 8192, "big": 2, "big_size": 32 * MiB}
    )
    top = tempfile.mkdtemp(prefix="bench-restore-", dir=args.dir)
    try:
        key = os.path.join(top, "authkey")
        generate_key_file(key)
        tree = os.path.join(top, "tree")
        nbytes = make_tree(tree, **sizes)
        results: list[dict[str, Any]] = []
        for run in range(args.runs):
            order = ["one-pass", "connection"] if run % 2 == 0 else ["connection", "one-pass"]
            for method in order:
                base = os.path.join(top, f"run{run}-{method}")
                r = one_run(base, key, method, tree)
                results.append(r)
                print(
                    f"run {run} {method:<10} wall {r['wall_s']:.2f} s  cpu {r['cpu_s']:.2f} s"
                    f"  identical {r['ok']}",
                    flush=True,
                )
                shutil.rmtree(base, ignore_errors=True)
        files = sizes["dirs"] * sizes["per_dir"] + sizes["big"]
        print(f"\n{files} files, {nbytes / MiB:.0f} MiB; median of {args.runs}")
        doc: dict[str, Any] = {"machine": machine_info(), "sizes": sizes, "results": results}
        for method in ("one-pass", "connection"):
            rs = [r for r in results if r["method"] == method]
            w = statistics.median(r["wall_s"] for r in rs)
            c = statistics.median(r["cpu_s"] for r in rs)
            doc[method] = {"wall_s": w, "cpu_s": c, "all_ok": all(r["ok"] for r in rs)}
            print(f"{method:<10} wall {w:.2f} s ({nbytes / MiB / w:.0f} MiB/s)  cpu {c:.2f} s")
        print(write_json(args.json, doc))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

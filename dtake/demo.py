"""Loopback demo: two services, a replication set, a mirror, live changes, verification.

`make demo` runs this until the lab demo (a 3-node pacemaker cluster) replaces it.
It exits 0 only when verification reports 0 differences and the trees are identical.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from dtake.testing import ServiceProcess, tree_diff

__all__ = ["main"]


def _step(n: int, text: str) -> float:
    print(f"[{n}] {text}", flush=True)
    return time.monotonic()


def main() -> int:
    work = tempfile.mkdtemp(prefix="dtake-demo-")
    src = os.path.join(work, "source", "data")
    dst = os.path.join(work, "target", "data")
    key = os.path.join(work, "authkey")
    services: list[ServiceProcess] = []
    t0 = time.monotonic()
    try:
        from dtake.protocol.auth import generate_key_file

        generate_key_file(key)
        _step(1, "creating 2,000 files on the source")
        for n in range(20):
            os.makedirs(os.path.join(src, f"dir{n:02}"), exist_ok=True)
            for f in range(100):
                with open(os.path.join(src, f"dir{n:02}", f"file{f:03}.txt"), "wb") as fh:
                    fh.write(os.urandom(2048))
        os.symlink("dir00/file000.txt", os.path.join(src, "latest"))
        os.makedirs(os.path.join(src, "empty"))
        _step(2, "starting two services on loopback (source and target)")
        a = ServiceProcess(os.path.join(work, "svc-a"), "alpha", key).start()
        services.append(a)
        b = ServiceProcess(os.path.join(work, "svc-b"), "beta", key).start()
        services.append(b)
        _step(3, f'replication set "demo": "{src} inc, rec", "{src}/dir19 exc, rec"')
        a.call("repset_create", name="demo", rules=[f"{src} inc, rec", f"{src}/dir19 exc, rec"])
        tm = _step(4, f"connect demo -> beta:{b.port} {dst} (full mirror)")
        conn = a.call(
            "connect", repset="demo", host="127.0.0.1", port=b.port, target_path=dst, mirror="full"
        )
        cid = int(conn["id"])
        a.call("wait", con_id=cid, timeout_s=300)
        print(f"    mirror complete in {time.monotonic() - tm:.2f}s")
        tl = _step(5, "live changes: create, append, rename a directory, chmod, delete")
        with open(os.path.join(src, "dir00", "new.log"), "w") as fh:
            fh.write("created while replicating\n")
        with open(os.path.join(src, "dir01", "file000.txt"), "ab") as fh:
            fh.write(b"appended")
        os.rename(os.path.join(src, "dir02"), os.path.join(src, "dir02-renamed"))
        os.chmod(os.path.join(src, "dir03", "file001.txt"), 0o600)
        os.unlink(os.path.join(src, "dir04", "file004.txt"))
        time.sleep(0.2)
        a.call("wait", con_id=cid, timeout_s=120)
        print(f"    replicated in {time.monotonic() - tl:.2f}s")
        _step(6, "verification (checksums)")
        result = a.call("verify", con_id=cid, checksum=True)
        print(f"    {result['files_checked']} files checked, {result['different']} differences")
        expected = {os.path.join("dir19", n) for n in os.listdir(os.path.join(src, "dir19"))} | {
            "dir19"
        }
        diffs = [d for d in tree_diff(src, dst) if d.split(": ", 1)[-1] not in expected]
        if result["different"] or diffs:
            for line in diffs[:20]:
                print("    " + line)
            print("DEMO FAILED: source and target differ")
            return 1
        excluded = os.path.exists(os.path.join(dst, "dir19"))
        if excluded:
            print("DEMO FAILED: the excluded directory was replicated")
            return 1
        st = a.call("status")["connections"][0]
        print(
            f"    state {st['state']}, mirror {st['mirror_status']}, replication {st['replication_status']}, "
            f"target data {st['target_data_state']}"
        )
        print(f"demo OK in {time.monotonic() - t0:.1f}s: 0 differences")
        return 0
    finally:
        for s in services:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

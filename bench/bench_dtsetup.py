"""dtsetup benchmark (issue 4): validate, plan, first apply and no-op apply wall times.

    .venv/bin/python -m bench.bench_dtsetup [--runs 3] [--reps 5] [--wheelhouse DIR]
        [--dir /var/tmp] [--json PATH] [--keep]

Every figure is the wall time of the real ``dtsetup`` command (``.venv/bin/dtsetup``, a
new process each time: interpreter start, imports and work, what an operator waits for),
on one DTSetup.ini laid out as the seed's setup directory [L684]: the file with a
``wheelhouse/`` beside it (a copy of the project's cached wheelhouse of dtake and its
dependencies), so apply installs the real software offline (``pip --no-index``).

Per run, in a fresh ``--root`` (an empty tree with ``etc/group`` and ``etc/gshadow``):

- ``validate FILE`` (expects exit 0);
- ``plan FILE --root R`` on the empty root (exit 2: everything would change);
- the first ``apply FILE --root R`` (exit 2): folders, venv + offline pip install,
  groups (``groupadd --prefix``), config, key, agents, systemd unit + enablement link
  (``systemd-offline``: the default init under ``--root``), record;
- then ``--reps`` times, interleaved so both see the same machine load: ``validate`` and
  a no-op ``apply`` on the converged root (exit 0, ``changed=0``); plus ``plan`` on the
  converged root and ``dtsetup --version`` (interpreter start + argparse: the floor).

Goal (issue 4): the no-op apply takes at most 3x the wall time of ``validate`` on the
same file. Nothing here asserts a timing; the table says whether the goal is met and the
JSON (``bench/results/dtsetup.json``) keeps every sample. The firewall is left alone
under ``--root`` (no firewall call is timed); nothing is started (systemd-offline).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Row, machine_info, render_table, summary, write_json

REPO = Path(__file__).resolve().parents[1]
DTSETUP = Path(sys.executable).parent / "dtsetup"
GOAL_RATIO = 3.0

INI = """\
[Config]
DTSETUPTYPE=DTNT
DTACTIVATIONCODE=ABCDEFGHJKLMNPQRSTUVWXY3
DOUBLETAKEFOLDER="/opt/dtake"
QMEMORYBUFFERMAX=128
DISKQUEUEFOLDER="/var/lib/dtake/queue"
DISKQUEUEMAXSIZE=UNLIMITED
DISKFREESPACEMIN=50
DTSERVICESTARTUP=1
PORT=6320
SET_FWPORT=Y
"""

MEASURES = (
    ("version", "dtsetup --version (start-up floor)"),
    ("validate", "validate"),
    ("plan_fresh", "plan, empty root"),
    ("apply_first", "first apply (venv + offline pip)"),
    ("apply_noop", "no-op apply (changed=0)"),
    ("plan_converged", "plan, converged root"),
)


def log(msg: str) -> None:
    print(f"[bench_dtsetup] {msg}", file=sys.stderr, flush=True)


def find_wheelhouse(given: str | None) -> Path:
    """``--wheelhouse``, else the newest complete cached one in build/wheelhouse/, else
    build one (``playbooks.wheelhouse``: ``pip wheel`` of this repo, cached)."""
    if given:
        return Path(given)
    cache = REPO / "build" / "wheelhouse"
    done = sorted(
        (d for d in cache.glob("*") if (d / ".complete").exists()),
        key=lambda d: (d / ".complete").stat().st_mtime,
    )
    if done:
        return done[-1]
    from playbooks.wheelhouse import build_wheelhouse

    log("no cached wheelhouse: building one (pip wheel of this repo, once)")
    return build_wheelhouse()[0]


def fresh_root(path: Path) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc/group").write_text("root:x:0:\nusers:x:100:\n")
    (path / "etc/gshadow").write_text("root:*::\nusers:*::\n")
    (path / "etc/gshadow").chmod(0o640)
    return path


class Bench:
    def __init__(self, work: Path, house: Path) -> None:
        self.work = work
        media = work / "media"
        media.mkdir()
        self.ini = media / "DTSetup.ini"
        self.ini.write_text(INI)
        # The seed's layout: the install files beside DTSetup.ini (no --wheelhouse needed).
        shutil.copytree(house, media / "wheelhouse", ignore=shutil.ignore_patterns(".*"))
        self.samples: dict[str, list[float]] = {k: [] for k, _ in MEASURES}
        self.cpu: dict[str, list[float]] = {k: [] for k, _ in MEASURES}
        self.failures: list[str] = []

    def timed(self, key: str, args: list[str], expect: int) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.monotonic()
        proc = subprocess.run(
            [str(DTSETUP), *args], capture_output=True, text=True, check=False, cwd=self.work
        )
        elapsed = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != expect:
            tail = (proc.stderr or proc.stdout).strip()[-600:]
            self.failures.append(f"{key}: exit {proc.returncode}, expected {expect}: {tail}")
            return
        if key == "apply_noop" and "changed=0" not in proc.stdout:
            self.failures.append(f"{key}: not a no-op: {proc.stdout.strip()[-300:]}")
            return
        self.samples[key].append(elapsed)
        self.cpu[key].append(cpu)

    def run(self, r: int, reps: int) -> None:
        root = fresh_root(self.work / f"root{r}")
        ini, at = str(self.ini), ["--root", str(root), "--host", "bench"]
        os.sync()  # the first apply writes ~60 MB: start from clean page cache state
        self.timed("validate", ["validate", ini], 0)
        self.timed("plan_fresh", ["plan", ini, *at], 2)
        self.timed("apply_first", ["apply", ini, *at], 2)
        os.sync()
        for _ in range(reps):
            self.timed("version", ["--version"], 0)
            self.timed("validate", ["validate", ini], 0)
            self.timed("apply_noop", ["apply", ini, *at], 0)
            self.timed("plan_converged", ["plan", ini, *at], 0)
        log(f"run {r + 1}: first apply {self.samples['apply_first'][-1:]} s")


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms" if values else "-"


def build_rows(samples: dict[str, list[float]], cpu: dict[str, list[float]]) -> list[Row]:
    rows: list[Row] = []
    for key, what in MEASURES:
        v = samples[key]
        note = (
            f"n={len(v)}, {min(v) * 1000:.0f}-{max(v) * 1000:.0f} ms; "
            f"CPU (user+sys, incl. children) median {_ms(cpu[key])}"
            if v
            else "no sample"
        )
        value = f"{statistics.median(v):.2f} s" if key == "apply_first" and v else _ms(v)
        rows.append(Row(what, value, "-", None, "(info)", None, note))
    noop, val = samples["apply_noop"], samples["validate"]
    if noop and val:
        ratio = statistics.median(noop) / statistics.median(val)
        rows.append(
            Row(
                "no-op apply / validate",
                _ms(noop),
                _ms(val),
                ratio,
                f"<= {GOAL_RATIO:.1f}",
                ratio <= GOAL_RATIO,
                "ratio = median no-op apply / median validate, same file, interleaved; "
                f"lower is better; CPU-time ratio "
                f"{statistics.median(cpu['apply_noop']) / statistics.median(cpu['validate']):.2f}",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_dtsetup", description=__doc__.split("\n")[0]
    )
    p.add_argument("--runs", type=int, default=3, help="fresh roots / first applies (default 3)")
    p.add_argument("--reps", type=int, default=5, help="no-op/validate pairs per run (default 5)")
    p.add_argument("--wheelhouse", default=None, help="default: newest build/wheelhouse/*")
    p.add_argument("--dir", default="/var/tmp", help="parent of the work dir (not tmpfs)")
    p.add_argument("--json", default=None, help="default bench/results/dtsetup.json")
    p.add_argument("--keep", action="store_true", help="keep the work dir (debugging)")
    a = p.parse_args(argv)
    if not DTSETUP.exists():
        raise SystemExit(f"{DTSETUP} not found (pip install -e . in the venv)")
    if shutil.which("groupadd") is None:
        raise SystemExit("groupadd not found (shadow-utils: passwd package)")
    house = find_wheelhouse(a.wheelhouse)
    work = Path(tempfile.mkdtemp(prefix="dtake-bench-dtsetup-", dir=a.dir))
    info = machine_info(str(work))
    started = time.time()
    log(f"work dir {work}, wheelhouse {house}")
    bench = Bench(work, house)
    try:
        for r in range(a.runs):
            bench.run(r, a.reps)
    finally:
        if a.keep:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    rows = build_rows(bench.samples, bench.cpu)
    title = (
        f"dtsetup benchmark ({a.runs} run(s) x {a.reps} reps, {info['cpus']} CPUs, "
        f"load {info['loadavg_at_start']}, fs {info.get('fs')})"
    )
    print(render_table(rows, title))
    if bench.failures:
        print("FAILURES:\n  " + "\n  ".join(bench.failures))
    doc: dict[str, Any] = {
        "bench": "dtsetup",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": "python -m bench.bench_dtsetup " + " ".join(argv or sys.argv[1:]),
        "machine": info,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "wheelhouse": str(house),
        "wheels": sorted(f.name for f in house.glob("*.whl")),
        "runs": a.runs,
        "reps": a.reps,
        "table": [r.to_dict() for r in rows],
        "results_s": {key: summary(bench.samples[key]) for key, _ in MEASURES},
        "cpu_s": {key: summary(bench.cpu[key]) for key, _ in MEASURES},
        "failures": bench.failures,
    }
    path = write_json(a.json or "dtsetup", doc)
    print(f"-> {path}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())

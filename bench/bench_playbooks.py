"""Benchmark the playbooks on a 3-node lab: deploy, cluster, resources, verify (one ssh
connection per host vs one per command; hosts in parallel vs one at a time) and the
rolling upgrade (first run and the no-op second run).

    sudo .venv/bin/python -m bench.bench_playbooks [--rounds 3] [--prefix dtpb] [--json PATH]
    sudo .venv/bin/python -m bench.bench_playbooks --from REV --rounds 0 [--sync-timeout 120]
        [--allow-protocol-break]

Prints a table (median, min, max) and writes JSON (default bench/results/playbooks.json).
Method: wall time of each playbook function as the CLI calls it (the lab's ssh_config,
ProxyCommand relay into the lab's namespaces), the wheelhouse built beforehand (untimed).
verify runs ``--rounds`` times in each mode against the converged cluster; the upgrade goes
to a wheelhouse whose dtake wheel is ``<version>+bench`` (``bumped_wheelhouse``), then
runs again (nothing to do). The lab is taken down at the end, pass or fail.

``--from REV`` installs first the dtake of git revision REV (``git archive``), so the
upgrade goes from that release to this tree: the rolling-upgrade compatibility check
between two builds (a failed upgrade is reported with its recap, not raised). From a
build that shares no peer protocol version with this tree the upgrade's plan refuses
(PROTOCOL_BREAK, nothing changed); ``--allow-protocol-break`` rolls anyway, as the
upgrade playbook's flag.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml

from bench.common import machine_info, summary, write_json
from lab import Lab
from playbooks.cli import ensure_key
from playbooks.cluster import ClusterOptions, cluster
from playbooks.demo import DTSETUP_INI, cluster_spec
from playbooks.deploy import DeployOptions, deploy
from playbooks.recap import PlaybookResult
from playbooks.remote import fabric_connector
from playbooks.resources import ResourcesOptions, resources
from playbooks.spec import load_spec
from playbooks.testing import bumped_wheelhouse
from playbooks.upgrade import upgrade, wait_in_sync
from playbooks.verify import VerifyOptions, verify
from playbooks.wheelhouse import REPO, build_wheelhouse

# name -> (multiplex, forks)
VERIFY_MODES = {
    "verify: 1 connection/host, hosts in parallel (default)": (True, 5),
    "verify: 1 connection/command, hosts in parallel": (False, 5),
    "verify: 1 connection/host, one host at a time": (True, 1),
    "verify: 1 connection/command, one host at a time": (False, 1),
}


def _timed(fn: Callable[[], PlaybookResult]) -> tuple[float, PlaybookResult]:
    t = time.monotonic()
    res = fn()
    took = time.monotonic() - t
    if res.exit_code != 0:
        raise RuntimeError(f"{res.playbook} failed:\n{res.render()}")
    return took, res


def _house_of(rev: str, work: Path) -> Path:
    """A wheelhouse built from git revision REV of this repo."""
    src = work / f"src-{rev.replace('/', '_')}"
    src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True, timeout=120
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True, timeout=120)
    return build_wheelhouse(repo=src, cache=work / "wheelhouses")[0]


def run(
    lab: Lab,
    rounds: int,
    work: Path,
    *,
    from_rev: str | None = None,
    sync_timeout: float = 600,
    allow_protocol_break: bool = False,
) -> dict[str, Any]:
    ini = work / "DTSetup.ini"
    ini.write_text(DTSETUP_INI)
    key = work / "key"
    ensure_key(key)
    house, _ = build_wheelhouse()
    first = _house_of(from_rev, work) if from_rev else house
    vip = lab.address("node1").rsplit(".", 1)[0] + ".100"
    spec_path = work / "cluster.yaml"
    addrs = {n: lab.address(n) for n in lab.nodes}
    spec_path.write_text(yaml.safe_dump(cluster_spec(lab.prefix, addrs, vip)))
    spec = load_spec(spec_path)
    for n in lab.nodes:
        lab.exec(n, ["mkdir", "-p", "/srv/data"])
    connect = fabric_connector(ssh_config=lab.ssh_config)
    o = DeployOptions(ini=ini, wheelhouse=first, auth_key=key)
    out: dict[str, Any] = {}

    def add(name: str, fn: Callable[[], PlaybookResult]) -> PlaybookResult:
        took, res = _timed(fn)
        out.setdefault(name, []).append(took)
        print(f"  {name}: {took:.1f}s", flush=True)
        return res

    add("deploy (first install, 3 nodes)", lambda: deploy(lab.nodes, connect, o))
    add("deploy (second run, no change)", lambda: deploy(lab.nodes, connect, o))
    add("cluster", lambda: cluster(spec, connect, ClusterOptions()))
    add("resources (create)", lambda: resources(spec, connect, ResourcesOptions()))
    add("resources (second run, no change)", lambda: resources(spec, connect, ResourcesOptions()))
    lab.wait_cluster(timeout=120, settle=True)
    ctl = connect("node1")  # verify checks the targets are OK: wait for the first mirror
    try:
        wait_in_sync(ctl, 300)
    finally:
        ctl.close()
    for _ in range(rounds):
        for name, (mux, forks) in VERIFY_MODES.items():
            vo = VerifyOptions(
                ssh_config=lab.ssh_config,
                expect_nodes=lab.nodes,
                timeout=600,
                multiplex=mux,
                forks=forks,
            )
            add(name, functools.partial(verify, lab.nodes, vo))
    new = work / "house-new"
    bumped_wheelhouse(house, new, "bench")
    on = DeployOptions(ini=ini, wheelhouse=new, auth_key=key)
    roll = functools.partial(
        upgrade,
        lab.nodes,
        connect,
        on,
        sync_timeout=sync_timeout,
        allow_protocol_break=allow_protocol_break,
    )
    try:
        add(f"upgrade (rolling, 3 nodes{', from ' + from_rev if from_rev else ''})", roll)
    except RuntimeError as e:
        print(f"  upgrade FAILED:\n{e}", flush=True)
        return {"upgrade_failed": str(e), **{k: summary(v, 2) for k, v in out.items()}}
    add("upgrade (second run, no change)", roll)
    return {name: summary(v, 2) for name, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.bench_playbooks", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="verify runs per mode (default 3)")
    p.add_argument("--prefix", default="dtpb", help="lab prefix (default dtpb)")
    p.add_argument("--json", default="playbooks", help="result file (bench/results/NAME.json)")
    p.add_argument(
        "--from", dest="from_rev", help="install git revision REV first, upgrade from it"
    )
    p.add_argument("--sync-timeout", type=float, default=600.0, help="upgrade resync wait (s)")
    p.add_argument(
        "--allow-protocol-break",
        action="store_true",
        help="upgrade even across a peer protocol break (as the playbook's flag)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_playbooks needs root (the lab)", file=sys.stderr)
        return 1
    lab = Lab(prefix=args.prefix, n=3)
    problems = lab.preflight()
    if problems:
        print("lab cannot run: " + "; ".join(problems), file=sys.stderr)
        return 1
    info = machine_info()
    try:
        lab.down()
        lab.up(timeout=180)
        with tempfile.TemporaryDirectory(prefix="bench-playbooks-") as tmp:
            results = run(
                lab,
                args.rounds,
                Path(tmp),
                from_rev=args.from_rev,
                sync_timeout=args.sync_timeout,
                allow_protocol_break=args.allow_protocol_break,
            )
    finally:
        lab.down()
    timings = {k: v for k, v in results.items() if isinstance(v, dict)}
    width = max(len(k) for k in timings)
    print(f"\n{'what':<{width}}  median    min    max  n")
    for name, s in timings.items():
        print(f"{name:<{width}}  {s['median']:6.1f} {s['min']:6.1f} {s['max']:6.1f}  {s['n']}")
    doc = {"machine": info, "rounds": args.rounds, "from": args.from_rev, "seconds": timings}
    if "upgrade_failed" in results:
        doc["upgrade_failed"] = results["upgrade_failed"]
    path = write_json(args.json, doc)
    print(f"\nwritten {path}")
    return 1 if "upgrade_failed" in results else 0


if __name__ == "__main__":
    sys.exit(main())

"""Agents: monitor wall time vs ocf:heartbeat:Dummy and dummypy; failover time vs Dummy.

    sudo .venv/bin/python -m bench.bench_agents [--runs 100] [--no-failover]

Monitor: each agent's recurring monitor is run RUNS times (after 5 warm-ups; the agents and
the baselines interleaved, so a load change on the shared machine hits all alike) against a
real local ``dtake serve`` holding a started replica / connection, with the pacemaker
tools absent from PATH being irrelevant (the monitor of a good replica connected to a
live source forks nothing). Dummy and dummypy run as installed by resource-agents, the
way baselines.md §3 measured them (state file in a temp dir). Interpreters: our agents
use the virtualenv's python by absolute path, as installed on nodes.

Failover: a 3-node lab; kill -9 of the node running the dependent resource -> the
dependent resource started elsewhere, for (a) a Dummy primitive and (b) a Dummy
colocated with the promoted ReplicatedDisk (the GeoCluster group). Median of a few kills.
Table on stdout, JSON in bench/results/agents.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")
HEARTBEAT = "/usr/lib/ocf/resource.d/heartbeat"


def _time_cmds(cmds: dict[str, tuple[list[str], dict[str, str]]], runs: int) -> dict[str, Any]:
    """Each command RUNS times after 5 warm-ups, interleaved (one run of each per round, in
    a rotating order), so a load change on the shared machine hits all of them alike."""
    names = list(cmds)
    for name in names:
        for _ in range(5):
            subprocess.run(cmds[name][0], env=cmds[name][1], capture_output=True, check=False)
    samples: dict[str, list[float]] = {n: [] for n in names}
    rcs: dict[str, int] = {}
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            argv, env = cmds[name]
            t0 = time.perf_counter()
            r = subprocess.run(argv, env=env, capture_output=True, check=False)
            samples[name].append((time.perf_counter() - t0) * 1000)
            rcs[name] = r.returncode
    out: dict[str, Any] = {}
    for name in names:
        xs = sorted(samples[name])
        out[name] = {
            "median_ms": round(statistics.median(xs), 2),
            "p95_ms": round(xs[max(0, int(len(xs) * 0.95) - 1)], 2),
            "rc": float(rcs.get(name, 0)),
        }
    return out


def bench_monitor(runs: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from dtake.protocol.auth import generate_key_file
    from dtake.testing import ServiceProcess
    from resource_agents.install import install

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dtake-bench-agents-") as tmp:
        key = os.path.join(tmp, "key")
        generate_key_file(key)
        a = ServiceProcess(os.path.join(tmp, "a"), "a", key).start()
        b = ServiceProcess(os.path.join(tmp, "b"), "b", key).start()
        try:
            agents = os.path.join(tmp, "agents")
            install(agents, PY)
            data = os.path.join(tmp, "data")
            os.makedirs(data)
            # Steady state: the pacemaker tools answer (stubs), so each value is published
            # once and later monitors fork nothing, as on a cluster node.
            stubs = os.path.join(tmp, "stubs")
            os.makedirs(stubs)
            for tool in ("crm_attribute", "cibadmin", "crm_node"):
                with open(os.path.join(stubs, tool), "w") as fh:
                    fh.write("#!/bin/sh\nexit 0\n")
                os.chmod(os.path.join(stubs, tool), 0o755)
            base = {
                "PATH": f"{stubs}:/usr/sbin:/usr/bin:/sbin:/bin",
                "OCF_ROOT": "/usr/lib/ocf",
                "OCF_RESKEY_CRM_meta_interval": "10000",
                "OCF_RESKEY_CRM_meta_timeout": "20000",
                "HA_RSCTMP": tmp,
            }
            # ReplicatedDisk: a started target copy that receives from a live source of
            # its own generation (the steady state of every unpromoted node).
            rd_env = {
                **base,
                "OCF_RESOURCE_INSTANCE": "rd",
                "OCF_RESKEY_directory": data,
                "OCF_RESKEY_socket": b.socket_path,
            }
            b.call("replica_start", resource="rd", directory=data)
            a.call("replica_start", resource="rd", directory=os.path.join(tmp, "src"))
            a.call(
                "replica_promote",
                resource="rd",
                peers=[{"node": "b", "host": "127.0.0.1", "port": b.port}],
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                st = b.call("replica_status", resource="rd")
                if st["data"] == "good" and st["source_connected"]:
                    break
                time.sleep(0.2)
            cmds: dict[str, tuple[list[str], dict[str, str]]] = {}
            rd = [os.path.join(agents, "ReplicatedDisk"), "monitor"]
            cmds["ReplicatedDisk (unpromoted)"] = (rd, rd_env)
            cmds["ReplicatedDisk (promoted)"] = (rd, {**rd_env, "OCF_RESKEY_socket": a.socket_path})
            sc_env = {
                **base,
                "OCF_RESOURCE_INSTANCE": "sc",
                "OCF_RESKEY_repset": "sc",
                "OCF_RESKEY_rules": f"{data} inc, rec",
                "OCF_RESKEY_target": "127.0.0.1",
                "OCF_RESKEY_port": str(b.port),
                "OCF_RESKEY_target_path": os.path.join(tmp, "sc-target"),
                "OCF_RESKEY_socket": a.socket_path,
            }
            subprocess.run(
                [os.path.join(agents, "SourceConnection"), "start"], env=sc_env, check=True
            )
            cmds["SourceConnection"] = (
                [os.path.join(agents, "SourceConnection"), "monitor"],
                sc_env,
            )
            dummy_env = {**base, "OCF_RESOURCE_INSTANCE": "d", "OCF_RESKEY_state": f"{tmp}/d.st"}
            subprocess.run([f"{HEARTBEAT}/Dummy", "start"], env=dummy_env, check=True)
            cmds["heartbeat:Dummy"] = ([f"{HEARTBEAT}/Dummy", "monitor"], dummy_env)
            py_env = {
                **dummy_env,
                "OCF_FUNCTIONS_DIR": f"{HEARTBEAT}",
                "PYTHONPATH": "/usr/lib/ocf/lib/heartbeat",
            }
            subprocess.run([f"{HEARTBEAT}/dummypy", "start"], env=py_env, check=False)
            cmds["heartbeat:dummypy"] = ([f"{HEARTBEAT}/dummypy", "monitor"], py_env)
            out.update(_time_cmds(cmds, runs))
        finally:
            for svc in (a, b):  # unblock the copies before the temp dir goes
                try:
                    svc.call("replica_stop", resource="rd")
                except Exception as exc:
                    print(f"replica_stop: {exc}", file=sys.stderr)
            a.stop()
            b.stop()
    return out


def bench_failover(kills: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    import test_agents as ta  # the same setup as the cluster tests

    from lab.pytest_plugin import make_lab

    lab = make_lab(3)
    out: dict[str, Any] = {}
    try:
        lab.up()
        from dtake.protocol.auth import generate_key_file

        with tempfile.TemporaryDirectory() as d:
            generate_key_file(os.path.join(d, "k"))
            key = Path(d, "k").read_bytes()
        for n in lab.nodes:
            lab.exec(n, ["mkdir", "-p", ta.DIR])
            ta.setup_node(lab, n, key)
        lab.exec("node1", ["cibadmin", "-C", "-o", "resources", "-X", ta.CLONE_XML])
        for rid, colo in (("bd-plain", None), ("bd-grd", ta.CLONE)):
            xml = (
                f'<primitive id="{rid}" class="ocf" provider="heartbeat" type="Dummy">'
                f'<operations><op id="{rid}-m" name="monitor" interval="5s"/></operations>'
                "</primitive>"
            )
            lab.exec("node1", ["cibadmin", "-C", "-o", "resources", "-X", xml])
            if colo:
                lab.exec(
                    "node1",
                    [
                        "cibadmin",
                        "-C",
                        "-o",
                        "constraints",
                        "-X",
                        f'<rsc_colocation id="{rid}-with" rsc="{rid}" with-rsc="{colo}" '
                        'with-rsc-role="Promoted" score="INFINITY"/>',
                    ],
                )
                lab.exec(
                    "node1",
                    [
                        "cibadmin",
                        "-C",
                        "-o",
                        "constraints",
                        "-X",
                        f'<rsc_order id="{rid}-after" first="{colo}" first-action="promote" '
                        f'then="{rid}" then-action="start"/>',
                    ],
                )
        times: dict[str, list[float]] = {"bd-plain": [], "bd-grd": []}
        for rid in ("bd-plain", "bd-grd"):
            for _ in range(kills):
                lab.wait_cluster(timeout=180)
                where = lab.wait_for(
                    lambda rid=rid: (lambda w: w[0] if len(w) == 1 else None)(
                        lab.cluster_status().running_on(rid)
                    ),
                    120,
                    what=f"{rid} running",
                )
                ta.wait_idle(lab, where) if rid == "bd-grd" else None
                observer = next(n for n in lab.nodes if n != where)
                t0 = time.monotonic()
                lab.kill(where)
                lab.wait_for(
                    lambda rid=rid, where=where, observer=observer: (
                        lambda w: len(w) == 1 and w[0] != where
                    )(lab.cluster_status(observer).running_on(rid)),
                    180,
                    interval=0.1,
                    what=f"{rid} failed over",
                )
                times[rid].append(time.monotonic() - t0)
                ta.reboot(lab, where)
        for rid, label in (("bd-plain", "Dummy"), ("bd-grd", "Dummy after ReplicatedDisk")):
            out[label] = {
                "median_s": round(statistics.median(times[rid]), 2),
                "runs_s": [round(t, 2) for t in times[rid]],
            }
        out["ratio"] = round(
            out["Dummy after ReplicatedDisk"]["median_s"] / out["Dummy"]["median_s"], 2
        )
    finally:
        lab.down()
    return out


def main() -> int:
    if os.environ.get("DTAKE_BENCH_NS") != "1" and os.geteuid() == 0:
        # Private mount namespace: the read-only bind mounts of the replica copies made by
        # the local services vanish with it (the lab has its own namespaces anyway).
        env = {**os.environ, "DTAKE_BENCH_NS": "1"}
        argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable]
        return subprocess.call(
            [*argv, "-m", "bench.bench_agents", *sys.argv[1:]], env=env, cwd=ROOT
        )
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--no-failover", action="store_true")
    args = ap.parse_args()
    res: dict[str, Any] = {"monitor": bench_monitor(args.runs)}
    print(f"{'monitor':<30} {'median ms':>10} {'p95 ms':>8}")
    for k, v in res["monitor"].items():
        print(f"{k:<30} {v['median_ms']:>10} {v['p95_ms']:>8}   rc {int(v['rc'])}")
    if not args.no_failover:
        res["failover"] = bench_failover(args.kills)
        for k, v in res["failover"].items():
            print(f"failover {k}: {v}")
    out = ROOT / "bench" / "results" / "agents.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

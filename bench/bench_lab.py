"""Benchmark the lab: up time (3 nodes), and Dummy failover after `kill` of its node.

The Dummy failover time is the baseline the ReplicatedDisk failover is compared
against (same lab, same corosync token, same observer method).

    sudo .venv/bin/python -m bench.bench_lab [--rounds 3] [--failovers 5] [--json PATH]

Prints a table (median, min, max) and writes JSON (default bench/results/lab.json).
Method: ``up`` is timed cold (state dir absent) through "DC elected with quorum and all
nodes online in crm_mon"; failover is timed from the SIGKILL of the node's pid-namespace
init until another node's ``crm_mon --output-as xml`` shows the resource active there
(polled; each poll costs ~30-60 ms, which bounds the resolution). The killed node is
restarted and the rejoin timed (until every node is online again), then the cluster is
left to settle (``crm_resource --wait``, untimed) before the next round.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab import Lab

RSC = "bench-dummy"
WAIT = 120.0


def dummy_xml() -> str:
    return (
        f'<primitive id="{RSC}" class="ocf" provider="heartbeat" type="Dummy">'
        f'<operations><op id="{RSC}-mon" name="monitor" interval="5s" timeout="20s"/>'
        "</operations></primitive>"
    )


def where(lab: Lab, via: str) -> list[str]:
    return lab.cluster_status(via).running_on(RSC)


def _running_elsewhere(lab: Lab, via: str, not_on: str | None) -> str | None:
    w = where(lab, via)
    return w[0] if len(w) == 1 and w[0] != not_on else None


def _only_on(lab: Lab, via: str, node: str) -> bool:
    return where(lab, via) == [node]


def resource_scenarios(lab: Lab, failovers: int, samples: dict[str, list[float]]) -> None:
    t = time.monotonic()
    lab.exec("node1", ["cibadmin", "-C", "-o", "resources", "-X", dummy_xml()])
    home = lab.wait_for(lambda: _running_elsewhere(lab, "node1", None), WAIT, interval=0.05)
    samples["Dummy start"].append(time.monotonic() - t)
    for _ in range(failovers):
        # the victim runs the resource and is not the DC (a DC kill is a separate case)
        dc = lab.cluster_status("node1").dc
        target = next(x for x in lab.nodes if x not in (home, dc))
        t = time.monotonic()
        lab.exec("node1", ["crm_resource", "--move", "-r", RSC, "--node", target])
        lab.wait_for(functools.partial(_only_on, lab, "node1", target), WAIT, interval=0.05)
        samples["Dummy move"].append(time.monotonic() - t)
        lab.exec("node1", ["crm_resource", "--clear", "-r", RSC])
        observer = next(x for x in lab.nodes if x != target)
        t = time.monotonic()
        lab.kill(target)
        elsewhere = functools.partial(_running_elsewhere, lab, observer, target)
        home = lab.wait_for(elsewhere, WAIT, interval=0.02)
        samples["Dummy failover after kill"].append(time.monotonic() - t)
        t = time.monotonic()
        lab.start(target)
        lab.wait_cluster(via=observer, timeout=WAIT, settle=False)
        samples["node rejoin after start"].append(time.monotonic() - t)
        lab.wait_cluster(via=observer, timeout=WAIT)  # its stale history probed away


def bench(rounds: int, failovers: int, n: int, prefix: str) -> dict[str, Any]:
    samples: dict[str, list[float]] = {
        "up (cold)": [],
        "down": [],
        "Dummy start": [],
        "Dummy move": [],
        "Dummy failover after kill": [],
        "node rejoin after start": [],
    }
    stages: list[list[tuple[str, float]]] = []
    for r in range(rounds):
        lab = Lab(prefix, n)
        problems = lab.preflight()
        if problems:
            raise SystemExit("lab cannot run here:\n" + "\n".join(problems))
        lab.down()  # a leftover from an interrupted run
        try:
            t = time.monotonic()
            rep = lab.up()
            samples["up (cold)"].append(time.monotonic() - t)
            stages.append(rep.stages)
            if r == rounds - 1:  # resource scenarios on the last lab only
                resource_scenarios(lab, failovers, samples)
        finally:
            t = time.monotonic()
            lab.down()
            samples["down"].append(time.monotonic() - t)
    return {
        "bench": "lab",
        "nodes": n,
        "rounds": rounds,
        "failovers": failovers,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": {
            k: {
                "median_s": round(statistics.median(v), 3),
                "min_s": round(min(v), 3),
                "max_s": round(max(v), 3),
                "n": len(v),
                "samples_s": [round(x, 3) for x in v],
            }
            for k, v in samples.items()
            if v
        },
        "up_stages_s": [{name: round(s, 3) for name, s in st} for st in stages],
    }


def render(res: dict[str, Any]) -> str:
    lines = [
        f"lab benchmark: {res['nodes']} nodes, {res['rounds']} cold ups, {res['failovers']} failovers",
        f"{'what':<30}{'median':>9}{'min':>9}{'max':>9}{'n':>4}",
    ]
    for k, v in res["results"].items():
        lines.append(
            f"{k:<30}{v['median_s']:>8.2f}s{v['min_s']:>8.2f}s{v['max_s']:>8.2f}s{v['n']:>4}"
        )
    if res["up_stages_s"]:
        lines.append(
            "up stages (last cold up): "
            + ", ".join(f"{k} {s:.2f}s" for k, s in res["up_stages_s"][-1].items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_lab", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rounds", type=int, default=3, help="cold up/down cycles (default 3)")
    p.add_argument(
        "--failovers", type=int, default=5, help="kill/failover/rejoin rounds (default 5)"
    )
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--prefix", default=f"b{os.getpid() % 100000}")
    default_json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lab.json")
    p.add_argument("--json", default=default_json)
    a = p.parse_args(argv)
    res = bench(a.rounds, a.failovers, a.nodes, a.prefix)
    print(render(res))
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

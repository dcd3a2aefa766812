"""The end-to-end demo (``make demo``): a 3-node lab cluster installed and configured by the
playbooks, then a failover and an online-pending recovery, with every acknowledged write
checked.

    sudo .venv/bin/python -m playbooks.demo [--prefix dtdemo] [--workdir DIR] [--keep]

Stages: lab up -> wheelhouse -> deploy (dtsetup from DTSetup.ini, all nodes) -> cluster ->
resources (ReplicatedDisk + a dependent IP/app group, from a cluster spec) -> second run
of all three playbooks (nothing changes) -> write on the active node, visible read-only
on the others -> kill the active node: automatic failover, acknowledged writes intact ->
reboot it (the deploy playbook restarts its service), it resyncs as a target -> online
pending: the survivors' copies are not known good when the active node dies, nothing is
promoted, ``dtake grd accept`` resolves it -> lab down. A summary with the time of each
stage and the data checked; exit 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from dtake.config import DEFAULT_PORT
from playbooks.cli import ensure_key
from playbooks.cluster import ClusterOptions, cluster
from playbooks.deploy import DeployOptions, deploy
from playbooks.recap import PlaybookResult
from playbooks.remote import fabric_connector
from playbooks.resources import ResourcesOptions, resources
from playbooks.spec import load_spec
from playbooks.wheelhouse import REPO, build_wheelhouse

__all__ = ["DemoError", "DemoReport", "main", "run_demo"]

DTAKE = "/opt/dtake/venv/bin/dtake"
RSC, DATA_DIR = "data", "/srv/data"
WAIT = 120.0


class DemoError(Exception):
    """A demo check failed; the message says which and what was seen."""


@dataclass
class DemoReport:
    stages: list[tuple[str, float]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    playbooks: dict[str, PlaybookResult] = field(default_factory=dict)
    total: float = 0.0
    ok: bool = False
    error: str = ""

    def summary(self) -> str:
        out = ["", "=" * 76, f"dtake demo: {'PASSED' if self.ok else 'FAILED'}"]
        if self.error:
            out.append(f"  error: {self.error}")
        out.append(f"  {'stage':<64} seconds")
        for name, s in self.stages:
            out.append(f"  {name:<64} {s:7.1f}")
        out.append(f"  {'total':<64} {self.total:7.1f}")
        if self.facts:
            out.append("  data checked:")
            for k, v in self.facts.items():
                out.append(f"    {k}: {v}")
        out.append("=" * 76)
        return "\n".join(out)


def _lab_cls() -> Any:
    if not (REPO / "lab").is_dir():
        raise DemoError(
            "the demo runs from a checkout of the dtake repo (lab/ is not in the wheel)"
        )
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from lab import Lab

    return Lab


DTSETUP_INI = f"""; DTSetup.ini for the demo: [Config] for every node, [node3] its own section
; (a machine section stands alone, it is not merged with [Config]) [seed L558-720]
[Config]
DTSETUPTYPE=DTNT
DTACTIVATIONCODE=DEMO0000000000000000DEMO
DOUBLETAKEFOLDER="/opt/dtake"
QMEMORYBUFFERMAX=128
DISKQUEUEFOLDER="/var/lib/dtake/queue"
DISKQUEUEMAXSIZE=UNLIMITED
DISKFREESPACEMIN=50
DTSERVICESTARTUP=Y
PORT={DEFAULT_PORT}
SET_FWPORT=Y

[node3]
DTSETUPTYPE=DTNT
DTACTIVATIONCODE=DEMO0000000000000000DEMO
DOUBLETAKEFOLDER="/opt/dtake"
QMEMORYBUFFERMAX=64
DISKQUEUEFOLDER="/var/lib/dtake/queue"
DISKQUEUEMAXSIZE=1024
DISKFREESPACEMIN=50
DTSERVICESTARTUP=Y
PORT={DEFAULT_PORT}
SET_FWPORT=Y
"""


def cluster_spec(name: str, addresses: dict[str, str], vip: str) -> dict[str, Any]:
    """The demo's cluster spec: ReplicatedDisk over all nodes, an IP + app group that
    follows the promoted copy."""
    nodes = list(addresses)
    return {
        "version": 1,
        "cluster": {
            "name": name,
            "transport": "knet",
            "token_ms": 1000,
            "nodes": [{"name": n, "addrs": [a]} for n, a in addresses.items()],
            "quorum": {"policy": "stop"},
            "properties": {"stonith-enabled": False},
        },
        "resources": [
            {
                "id": RSC,
                "type": "ReplicatedDisk",
                "directory": DATA_DIR,
                "owners": nodes,
                "params": {"sourcefailoverdelay": 10},
                "ops": [
                    {"name": "monitor", "interval": "3s", "timeout": "30s", "role": "Promoted"},
                    {"name": "monitor", "interval": "4s", "timeout": "30s", "role": "Unpromoted"},
                    {"name": "start", "timeout": "60s"},
                    {"name": "stop", "timeout": "60s"},
                    {"name": "promote", "timeout": "60s"},
                    {"name": "demote", "timeout": "60s"},
                ],
            },
            {
                "id": "app-ip",
                "agent": "ocf:heartbeat:IPaddr2",
                "params": {"ip": vip, "cidr_netmask": 24, "nic": "eth0"},
                "ops": [{"name": "monitor", "interval": "10s", "timeout": "20s"}],
            },
            {
                "id": "app",
                "agent": "ocf:heartbeat:Dummy",
                "ops": [{"name": "monitor", "interval": "10s", "timeout": "20s"}],
            },
        ],
        "groups": [{"id": "app-group", "resources": ["app-ip", "app"]}],
        "constraints": {
            "colocation": [{"rsc": "app-group", "with": RSC, "with_role": "Promoted"}],
            "order": [
                {
                    "first": RSC,
                    "first_action": "promote",
                    "then": "app-group",
                    "then_action": "start",
                }
            ],
        },
    }


class Demo:
    def __init__(self, *, prefix: str, workdir: Path, out: TextIO, n: int = 3) -> None:
        self.prefix = prefix
        self.workdir = workdir
        self.out = out
        self.lab = _lab_cls()(prefix=prefix, n=n)
        self.report = DemoReport()
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ output
    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=self.out, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"==> {name}")
        t = time.monotonic()
        yield
        took = time.monotonic() - t
        self.report.stages.append((name, took))
        self.say(f"    done in {took:.1f}s")

    def playbook(self, key: str, result: PlaybookResult, *, expect_change: bool | None) -> None:
        self.report.playbooks[key] = result
        for line in result.render().splitlines():
            self.say("    " + line)
        if result.exit_code != 0:
            raise DemoError(f"playbook {key} failed on {', '.join(result.failed_hosts) or '-'}")
        if expect_change is False and result.changed:
            raise DemoError(f"playbook {key}: a second run changed something")

    # ------------------------------------------------------------------ cluster views
    def exec(self, node: str, cmd: list[str] | str, **kw: Any) -> str:
        return str(self.lab.exec(node, cmd, **kw).stdout)

    def roles(self, via: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for r in self.lab.cluster_status(via).resources:
            if r.id.split(":")[0] == RSC and r.active:
                for n in r.nodes:
                    out[n] = r.role
        return out

    def promoted(self, via: str) -> list[str]:
        return sorted(n for n, r in self.roles(via).items() if r in ("Promoted", "Master"))

    def wait_promoted(self, via: str, *, not_on: str | None = None) -> str:
        def one() -> str | None:
            p = self.promoted(via)
            return p[0] if len(p) == 1 and p[0] != not_on else None

        return str(self.lab.wait_for(one, WAIT, interval=0.5, what=f"one promoted {RSC}"))

    def digest(self, node: str, path: str = DATA_DIR) -> set[str]:
        out = self.exec(node, f"cd {path} && find . -type f -exec md5sum {{}} + | sort", timeout=60)
        return set(out.splitlines())

    def wait_same(self, a: str, b: str) -> int:
        def same() -> int | None:
            da, db = self.digest(a), self.digest(b)
            return len(da) if da == db else None

        return int(self.lab.wait_for(same, WAIT, interval=0.5, what=f"{DATA_DIR} same on {a}, {b}"))

    def wait_idle(self, node: str) -> None:
        st = json.loads(self.exec(node, [DTAKE, "--json", "status"]))
        for c in st["connections"]:
            self.exec(node, [DTAKE, "wait", str(c["id"]), "--idle", "--timeout", "90"], timeout=120)

    def replica(self, node: str) -> dict[str, Any]:
        return dict(json.loads(self.exec(node, [DTAKE, "--json", "grd", "status", RSC])))

    # ------------------------------------------------------------------ the flow
    def run(self) -> DemoReport:
        lab, facts = self.lab, self.report.facts
        with self.stage("lab up: 3 nodes (corosync + pacemaker + sshd in namespaces)"):
            problems = lab.preflight()
            if problems:
                raise DemoError("this machine cannot run the lab: " + "; ".join(problems))
            lab.down()  # a lab left over by an interrupted run
            up = lab.up(timeout=180)
            self.say(f"    nodes {', '.join(f'{n}={lab.address(n)}' for n in lab.nodes)}")
            self.say(f"    lab up in {up.total:.1f}s (ssh -F {lab.ssh_config} node1)")
        with self.stage("wheelhouse: pip wheel of dtake + dependencies (once)"):
            house, built = build_wheelhouse()
            self.say(f"    {'built' if built else 'reused'} {house}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        ini = self.workdir / "DTSetup.ini"
        ini.write_text(DTSETUP_INI)
        os.chmod(ini, 0o600)
        key = self.workdir / "dtake-cluster.key"
        ensure_key(key)
        addresses = {n: lab.address(n) for n in lab.nodes}
        vip = lab.address(lab.nodes[0]).rsplit(".", 1)[0] + ".100"
        spec_path = self.workdir / "cluster.yaml"
        spec_path.write_text(
            yaml.safe_dump(cluster_spec(self.prefix, addresses, vip), sort_keys=False)
        )
        spec = load_spec(spec_path)
        self.say(f"    DTSetup.ini and cluster spec in {self.workdir}")
        connect = fabric_connector(ssh_config=lab.ssh_config, host_timeout=600)
        dopts = DeployOptions(
            ini=ini, wheelhouse=house, auth_key=key, retry_file=self.workdir / "DTSetup.retry"
        )
        for n in lab.nodes:
            lab.exec(n, ["mkdir", "-p", DATA_DIR])
        with self.stage("deploy: silent install from DTSetup.ini on all nodes (dtsetup)"):
            self.playbook("deploy", deploy(lab.nodes, connect, dopts), expect_change=None)
        with self.stage("cluster: converge corosync/pacemaker to the spec"):
            self.playbook("cluster", cluster(spec, connect, ClusterOptions()), expect_change=None)
        with self.stage("resources: ReplicatedDisk + app group from the spec"):
            self.playbook(
                "resources", resources(spec, connect, ResourcesOptions()), expect_change=None
            )
            active = self.wait_promoted(lab.nodes[0])
            self.say(f"    {RSC} promoted on {active}")
        with self.stage("second run of deploy, cluster, resources: nothing changes"):
            self.playbook("deploy#2", deploy(lab.nodes, connect, dopts), expect_change=False)
            self.playbook(
                "cluster#2", cluster(spec, connect, ClusterOptions()), expect_change=False
            )
            self.playbook(
                "resources#2", resources(spec, connect, ResourcesOptions()), expect_change=False
            )
        others = [n for n in lab.nodes if n != active]
        with self.stage(f"write on the active node {active}; read-only copies on the others"):
            self.exec(
                active,
                f"mkdir -p {DATA_DIR}/orders && seq 1 300 | while read i; do "
                f"echo order-$i-$(date +%s%N) > {DATA_DIR}/orders/o$i; done && "
                f"head -c 4000000 /dev/urandom > {DATA_DIR}/blob.bin",
            )
            self.wait_idle(active)  # every write acknowledged by every owner
            acked = self.digest(active)
            for n in others:
                files = self.wait_same(active, n)
                r = lab.exec(n, f"echo x > {DATA_DIR}/not-here", check=False)
                if r.returncode == 0 or "Read-only" not in r.stderr:
                    raise DemoError(f"{n}: the target copy is writable ({r.stderr.strip()})")
                self.say(f"    {n}: {files} files identical, writes refused (read-only)")
            facts["files written and acknowledged"] = len(acked)
        with self.stage(f"kill {active} (pull the plug): automatic failover"):
            t = time.monotonic()
            lab.kill(active)
            new = self.wait_promoted(others[0], not_on=active)
            failover = time.monotonic() - t
            have = self.digest(new)
            lost = acked - have
            if lost:
                raise DemoError(f"{len(lost)} acknowledged writes missing on {new}")
            grp = lab.wait_for(
                lambda: lab.cluster_status(new).running_on("app-ip") == [new],
                WAIT,
                what="app group on the new active node",
            )
            assert grp
            self.say(f"    {new} promoted {failover:.1f}s after the kill; app group followed")
            self.say(f"    all {len(acked)} acknowledged files intact on {new}")
            facts["failover (kill -> promoted)"] = f"{failover:.1f}s, {new}"
            facts["acknowledged writes lost at failover"] = 0
        with self.stage(f"reboot {active}: the deploy playbook restarts its service"):
            lab.start(active)
            lab.wait_cluster(via=new, timeout=WAIT, settle=False)
            self.playbook("deploy (reboot)", deploy([active], connect, dopts), expect_change=True)
            # pacemaker came up before the dtake service (no init ordering in lab nodes), so
            # its start of the replica there failed: clear that, as an operator would
            self.exec(
                new, ["crm_resource", "--cleanup", "--resource", f"{RSC}-clone", "--node", active]
            )
            self.say(f"    crm_resource --cleanup --resource {RSC}-clone --node {active}")
            lab.wait_for(
                lambda: self.roles(new).get(active) in ("Unpromoted", "Slave"),
                WAIT,
                interval=1,
                what=f"{active} back as a target",
            )
            self.exec(new, f"echo after-failover > {DATA_DIR}/after-failover")
            n = self.wait_same(new, active)
            self.say(f"    {active}: resynced from {new} as a read-only target ({n} files)")
        with self.stage("online pending: the active node dies while its targets are stale"):
            p = self.wait_promoted(new)
            survivors = [x for x in lab.nodes if x != p]
            self.wait_idle(p)
            acked = self.digest(p)
            conns = json.loads(self.exec(p, [DTAKE, "--json", "status"]))["connections"]
            for c in conns:  # a full mirror that cannot finish: the targets' copies go pending
                self.exec(p, [DTAKE, "transmit", "pause", str(c["id"])])
                self.exec(p, [DTAKE, "mirror", "start", str(c["id"]), "--mode", "full"])
            for s in survivors:
                lab.wait_for(
                    lambda s=s: self.replica(s)["data"] == "pending", WAIT, what=f"{s} pending"
                )
            lab.kill(p)
            a, b = survivors

            def pending_shown() -> str | None:
                st = lab.cluster_status(a)
                out = self.exec(a, ["crm_mon", "-1", "-A"])
                if st.nodes[p].online or "is pending. Data integrity not guaranteed." not in out:
                    return None
                return out

            crm = str(lab.wait_for(pending_shown, WAIT, interval=1, what="online pending"))
            lab.exec(a, ["crm_resource", "--wait", "--timeout=60s"], timeout=90, check=False)
            if self.promoted(a):
                raise DemoError(f"a stale replica was promoted automatically: {self.promoted(a)}")
            for line in crm.splitlines():
                if "dtake-data-status" in line:
                    self.say("    crm_mon -A:" + line.split(":", 1)[1].rstrip())
            for line in self.exec(a, [DTAKE, "grd", "status", RSC]).splitlines():
                self.say("    grd status: " + line)
            self.say(
                f"    nothing promoted (online pending); operator: dtake grd accept {RSC} on {b}"
            )
            t = time.monotonic()
            self.exec(b, [DTAKE, "grd", "accept", RSC], timeout=120)
            got = self.wait_promoted(a, not_on=p)
            if got != b:
                raise DemoError(f"grd accept on {b} but {got} was promoted")
            lost = acked - self.digest(b)
            if lost:
                raise DemoError(f"{len(lost)} acknowledged writes missing on {b} after accept")
            self.say(f"    {b} promoted {time.monotonic() - t:.1f}s after accept; data intact")
            facts["online pending resolved by"] = f"dtake grd accept {RSC} on {b}"
            facts["acknowledged files checked after accept"] = len(acked)
        with self.stage("lab down"):
            lab.down()
        self.report.ok = True
        return self.report


def run_demo(
    *,
    prefix: str = "dtdemo",
    workdir: Path | None = None,
    keep: bool = False,
    out: TextIO | None = None,
) -> DemoReport:
    """Run the whole demo; never leaves the lab up unless ``keep``. Returns the report."""
    out = out or sys.stdout
    demo = Demo(prefix=prefix, workdir=workdir or Path(f"/var/tmp/dtake-demo-{prefix}"), out=out)
    try:
        demo.run()
    except Exception as e:  # every failure ends in the summary, never in a half-torn lab
        demo.report.error = f"{type(e).__name__}: {e}"
        demo.say(f"!!! {demo.report.error}")
    finally:
        if not keep or demo.report.ok:
            try:
                demo.lab.down()
            except Exception as e:
                demo.say(f"!!! lab down: {e}")
        elif keep:
            demo.say(f"lab kept: python -m lab --prefix {prefix} status | down")
        demo.report.total = time.monotonic() - demo.t0
    print(demo.report.summary(), file=out, flush=True)
    return demo.report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m playbooks.demo", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--prefix", default="dtdemo", help="lab prefix (default dtdemo)")
    ap.add_argument("--workdir", type=Path, help="DTSetup.ini, spec, key (default /var/tmp/...)")
    ap.add_argument("--keep", action="store_true", help="keep the lab up when a check fails")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (namespaces, mounts): sudo make demo", file=sys.stderr)
        return 1
    report = run_demo(prefix=args.prefix, workdir=args.workdir, keep=args.keep)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

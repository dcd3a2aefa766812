"""The lab itself, against real corosync/pacemaker/sshd in namespaces.

One 3-node lab for the module (fixture ``lab_cluster``); the tests run in file
order and each one leaves the cluster as it found it. The last test takes the
lab down and checks that nothing is left behind. Waits are bounded; no test
asserts a timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lab import Lab, LabError, NodeCommandError, NodeDown, netns, preflight
from lab.proc import Proc, stat
from lab.pytest_plugin import make_lab, require_lab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.cluster

RSC = "lab-dummy"
WAIT = 90.0  # bound for every cluster transition (they take seconds)


def dummy_xml(rsc: str) -> str:
    return (
        f'<primitive id="{rsc}" class="ocf" provider="heartbeat" type="Dummy">'
        f'<operations><op id="{rsc}-mon" name="monitor" interval="5s" timeout="20s"/>'
        "</operations></primitive>"
    )


def running_on(lab: Lab, rsc: str, via: str) -> list[str]:
    return lab.cluster_status(via).running_on(rsc)


def wait_running(lab: Lab, rsc: str, via: str, *, not_on: str | None = None) -> str:
    """The one node that runs RSC (seen from VIA), once it runs exactly once elsewhere than NOT_ON."""

    def ok() -> str | None:
        where = running_on(lab, rsc, via)
        return where[0] if len(where) == 1 and where[0] != not_on else None

    return lab.wait_for(ok, WAIT, what=f"{rsc} running on one node other than {not_on}")


def test_all_nodes_online_and_quorate(lab_cluster: Lab) -> None:
    lab = lab_cluster
    assert lab.nodes == ["node1", "node2", "node3"]
    for node in lab.nodes:
        st = lab.cluster_status(node)
        assert st.quorate, f"{node} sees no quorum"
        assert st.dc in lab.nodes
        assert st.online == ["node1", "node2", "node3"], f"seen from {node}"
        assert "<pacemaker-result api-version=" in st.xml


def test_nodes_are_isolated(lab_cluster: Lab) -> None:
    lab = lab_cluster
    for node in lab.nodes:
        assert lab.exec(node, "hostname").stdout.strip() == node
        assert lab.exec(node, ["crm_node", "-n"]).stdout.strip() == node
        # own pid namespace: PID 1 is the node's init, and only this node's daemons
        ps = lab.exec(node, ["ps", "-e", "-o", "pid=,comm="]).stdout.split("\n")
        assert ps[0].split()[0] == "1"
        assert sum("corosync" in line for line in ps) == 1
        # own network: only its own lab address, no route to anything else
        addrs = lab.exec(node, ["ip", "-o", "-4", "addr", "show"]).stdout
        assert f"inet {lab.address(node)}/" in addrs
        assert lab.exec(node, ["ip", "route"]).stdout.count("default") == 0
    # private dirs: a file written on node1 is not seen on node2, and maps to the host path
    lab.exec("node1", "echo one > /srv/marker && echo one > /etc/dtake/marker")
    assert lab.exec("node2", "ls /srv /etc/dtake").stdout.split() == ["/etc/dtake:", "/srv:"]
    with open(lab.host_path("node1", "/srv/marker"), encoding="utf-8") as f:
        assert f.read() == "one\n"
    assert not os.path.exists("/etc/dtake/marker")
    lab.exec("node1", "rm /srv/marker /etc/dtake/marker")
    lab.write_file("node2", "/etc/dtake/dtake.yaml", "port: 6320\n", mode=0o600)
    assert lab.read_file("node2", "/etc/dtake/dtake.yaml") == "port: 6320\n"
    assert os.stat(lab.host_path("node2", "/etc/dtake/dtake.yaml")).st_mode & 0o777 == 0o600
    lab.exec("node2", "rm /etc/dtake/dtake.yaml")
    # the ocf provider dir for dtake exists, empty and private
    assert lab.exec("node3", "ls -A /usr/lib/ocf/resource.d/dtake").stdout == ""
    # the repo (and its virtualenv) is visible inside the nodes
    here = os.path.dirname(os.path.abspath(__file__))
    assert lab.exec("node2", ["test", "-f", os.path.join(here, "test_lab.py")]).returncode == 0


def test_exec_reports_failures_and_timeouts(lab_cluster: Lab) -> None:
    lab = lab_cluster
    with pytest.raises(NodeCommandError) as e:
        lab.exec("node1", "echo oops >&2; exit 3")
    assert e.value.result.returncode == 3
    assert "oops" in str(e.value)
    with pytest.raises(NodeCommandError) as e:
        lab.exec("node1", ["sleep", "30"], timeout=0.5)
    assert e.value.timed_out

    def sleep_gone() -> bool:  # killed with its process group (reaped by the node's init)
        return "sleep" not in lab.exec("node1", ["ps", "-e", "-o", "comm="]).stdout

    lab.wait_for(sleep_gone, 10, what="timed-out command killed")
    with pytest.raises(LabError):
        lab.exec("node7", "true")


def test_ssh_with_lab_key(lab_cluster: Lab) -> None:
    lab = lab_cluster
    r = subprocess.run(
        ["ssh", "-F", lab.ssh_config, "-o", "BatchMode=yes", "node2", "hostname"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "node2"
    # nodes log in to each other by name (playbooks run from a node work too)
    out = lab.exec("node1", "ssh -o BatchMode=yes node3 hostname", timeout=30).stdout
    assert out.strip() == "node3"
    with lab.connect("node3", 22) as s:
        assert s.recv(64).startswith(b"SSH-2.0-")


def test_spawn_is_tracked_and_ended(lab_cluster: Lab) -> None:
    lab = lab_cluster
    sp = lab.spawn("node2", ["sleep", "1000"], name="sleeper")
    assert sp.running()
    assert "sleep" in lab.exec("node2", ["ps", "-e", "-o", "comm="]).stdout

    def sleep_gone() -> bool:  # killed with its process group (reaped by the node's init)
        return "sleep" not in lab.exec("node1", ["ps", "-e", "-o", "comm="]).stdout

    lab.wait_for(sleep_gone, 10, what="timed-out command killed")
    assert [s.name for s in lab.spawned("node2")] == ["sleeper"]
    sp.stop(timeout=5)
    assert not sp.running()
    assert lab.spawned("node2") == []


def test_dummy_starts_moves_fails_over_and_node_rejoins(lab_cluster: Lab) -> None:
    lab = lab_cluster
    lab.exec("node1", ["cibadmin", "-C", "-o", "resources", "-X", dummy_xml(RSC)])
    try:
        first = wait_running(lab, RSC, "node1")
        # move it to a node that is not the DC, so the kill below is not a DC election
        dc = lab.cluster_status("node1").dc
        target = next(n for n in lab.nodes if n not in (first, dc)) if first == dc else first
        if target != first:
            lab.exec("node1", ["crm_resource", "--move", "-r", RSC, "--node", target])
            assert wait_running(lab, RSC, "node1", not_on=first) == target
            lab.exec("node1", ["crm_resource", "--clear", "-r", RSC])
        observer = next(n for n in lab.nodes if n != target)

        lab.kill(target)
        assert not lab.running(target)
        with pytest.raises(NodeDown):
            lab.exec(target, "true")
        survivor = wait_running(lab, RSC, observer, not_on=target)
        assert survivor != target
        st = lab.cluster_status(observer)
        assert not st.nodes[target].online
        assert st.quorate

        lab.start(target)
        lab.wait_cluster(via=observer, timeout=WAIT)
        assert running_on(lab, RSC, target) == running_on(lab, RSC, observer)
        assert len(running_on(lab, RSC, observer)) == 1
    finally:
        lab.exec(
            lab.first_running(),
            ["crm_resource", "--delete", "-r", RSC, "-t", "primitive"],
            check=False,
        )


def test_netdown_partitions_and_netup_heals(lab_cluster: Lab) -> None:
    lab = lab_cluster
    victim = "node3"
    lab.netdown(victim)
    try:

        def partitioned() -> bool:
            mine, theirs = lab.cluster_status(victim), lab.cluster_status("node1")
            return (
                not mine.quorate
                and mine.online == [victim]
                and theirs.quorate
                and not theirs.nodes[victim].online
            )

        lab.wait_for(partitioned, WAIT, what=f"{victim} cut off")
        # the cable is really out: no packet reaches the others
        ping = lab.exec(victim, ["ping", "-c1", "-W1", lab.address("node1")], check=False)
        assert ping.returncode != 0
    finally:
        lab.netup(victim)
    for node in lab.nodes:
        lab.wait_cluster(via=node, timeout=WAIT)


def test_up_is_idempotent(lab_cluster: Lab) -> None:
    lab = lab_cluster
    before = {n: lab.status().nodes[i].init_pid for i, n in enumerate(lab.nodes)}
    rep = lab.up()
    assert rep.already_up
    assert {n: lab.status().nodes[i].init_pid for i, n in enumerate(lab.nodes)} == before
    # a second lab with the same prefix cannot be built with another size
    with pytest.raises(LabError):
        Lab(lab.prefix, 2, state_dir=lab.state_dir).up()


def _lab_processes(lab: Lab) -> list[Proc]:
    """Every process in the lab's namespaces, plus the ones the lab recorded."""
    procs: list[Proc] = []
    for ns in [lab.hub, *map(lab.netns_of, lab.nodes)]:
        out = netns.ip("netns", "pids", ns, check=False).stdout.split()
        procs += [p for p in map(lambda x: Proc.of(int(x)), out) if p is not None]
    for node in lab.nodes:
        rec = lab._state["nodes"][node]
        procs += [Proc.from_json(rec[k]) for k in ("unshare", "init") if rec.get(k)]
    return procs


def assert_nothing_left(lab: Lab, procs: list[Proc], names: list[str]) -> None:
    # processes: none left running (zombies wait for the host's pid 1 to reap them)
    lab.wait_for(lambda: not any(p.running() for p in procs), 15, what="lab processes gone")
    for p in procs:
        st = stat(p.pid)
        assert st is None or st[2] != p.start or st[0] == "Z", f"pid {p.pid} still {st}"
    # namespaces
    for ns in names:
        assert not netns.exists(ns), ns
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed.split() for ns in names)
    # mounts
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mounts = f.read()
    assert lab.state_dir not in mounts
    assert not any(f"/run/netns/{ns} " in mounts for ns in names)
    # files
    assert not os.path.exists(lab.state_dir)
    assert not os.path.exists(lab.state_dir + ".lock")
    assert not lab.status().up


def test_down_leaves_nothing_behind(lab_cluster: Lab) -> None:
    lab = lab_cluster
    lab.spawn("node1", ["sleep", "1000"], name="leftover")
    procs = _lab_processes(lab)
    assert len(procs) > 3 * 9  # sshd, corosync, pacemaker's 7 per node, inits...
    names = [lab.hub, *map(lab.netns_of, lab.nodes)]
    lab.down()
    assert_nothing_left(lab, procs, names)
    assert lab.down() == []  # and down again is a no-op


def test_down_after_the_lab_process_crashed() -> None:
    """SIGKILL `python -m lab up` halfway: a new Lab object cleans up from the state dir alone."""
    lab = make_lab(2)
    require_lab(lab)
    argv = [sys.executable, "-m", "lab", "--prefix", lab.prefix, "--state-dir", lab.state_dir]
    p = subprocess.Popen(
        [*argv, "up", "2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def booted() -> bool:
            fresh = Lab(lab.prefix, 2, state_dir=lab.state_dir)
            return bool(fresh._state) and all(fresh.running(n) for n in fresh.nodes)

        lab.wait_for(booted, 60, interval=0.05, what="nodes booted by the CLI")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        fresh = Lab(lab.prefix, 2, state_dir=lab.state_dir)
        procs = _lab_processes(fresh)
        assert procs
        fresh.down()
        assert_nothing_left(fresh, procs, [fresh.hub, *map(fresh.netns_of, fresh.nodes)])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        Lab(lab.prefix, 2, state_dir=lab.state_dir).down()


def test_preflight_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(preflight.shutil, "which", lambda *a, **k: None)
    problems = preflight.check("/run/dtake-lab-x")
    text = "\n".join(problems)
    assert "needs root" in text and "sudo" in text
    assert "pacemaker" in text and "apt-get install" in text and "make deps" in text


def test_missing_requirements_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab("tpre", 3)
    monkeypatch.setattr(Lab, "preflight", lambda self: ["no corosync: apt-get install corosync"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install corosync"):
        require_lab(lab)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_lab(lab)

"""The playbooks against a real 3-node lab: deploy (twice, and with a host unreachable),
cluster + resources from a spec (twice), spec errors, verify with testinfra, and a rolling
upgrade to a newer version (twice).

One lab for the module; tests build on each other in file order.
"""

from __future__ import annotations

import io
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from lab import Lab
from playbooks.cli import ensure_key, main
from playbooks.cluster import ClusterOptions, cluster
from playbooks.demo import DTSETUP_INI, cluster_spec
from playbooks.deploy import DeployOptions, deploy
from playbooks.recap import (
    EXIT_OK,
    EXIT_SPEC,
    EXIT_UNREACHABLE,
    PlaybookResult,
    read_retry_file,
)
from playbooks.remote import Connector, fabric_connector
from playbooks.resources import ResourcesOptions, resources
from playbooks.spec import ClusterSpec, load_spec
from playbooks.testing import bumped_wheelhouse
from playbooks.upgrade import upgrade, wait_in_sync
from playbooks.verify import VerifyOptions, verify
from playbooks.wheelhouse import build_wheelhouse

pytestmark = pytest.mark.cluster


class Env:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.ini = tmp / "DTSetup.ini"
        self.ini.write_text(DTSETUP_INI)
        self.key = tmp / "dtake-cluster.key"
        ensure_key(self.key)
        self.house = build_wheelhouse()[0]
        self.spec_path = tmp / "cluster.yaml"
        vip = lab.address("node1").rsplit(".", 1)[0] + ".100"
        addrs = {n: lab.address(n) for n in lab.nodes}
        self.spec_path.write_text(yaml.safe_dump(cluster_spec(lab.prefix, addrs, vip)))
        for n in lab.nodes:
            lab.exec(n, ["mkdir", "-p", "/srv/data"])

    def connect(self, **kw: float) -> Connector:
        return fabric_connector(ssh_config=self.lab.ssh_config, **kw)

    def opts(self, **kw: object) -> DeployOptions:
        o = DeployOptions(
            ini=self.ini, wheelhouse=self.house, auth_key=self.key, retry_file=self.tmp / "r.retry"
        )
        for k, v in kw.items():
            setattr(o, k, v)
        return o

    @property
    def spec(self) -> ClusterSpec:
        return load_spec(self.spec_path)


@pytest.fixture(scope="module")
def env(lab_cluster: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield Env(lab_cluster, tmp_path_factory.mktemp("playbooks"))


def test_deploy_with_one_host_unreachable(env: Env) -> None:
    lab = env.lab
    lab.netdown("node3")
    try:
        res = deploy(lab.nodes, env.connect(connect_timeout=5), env.opts(host_timeout=240))
    finally:
        lab.netup("node3")
    by = {h.host: h for h in res.hosts}
    assert by["node3"].failed, res.render()
    assert not by["node1"].failed and not by["node2"].failed, res.render()
    assert by["node1"].changed and by["node2"].changed
    assert res.exit_code in (EXIT_UNREACHABLE, 2)
    assert read_retry_file(env.tmp / "r.retry") == ["node3"]
    assert "failed hosts: node3" in res.render()


def test_retry_then_second_deploy_changes_nothing(env: Env) -> None:
    lab = env.lab
    lab.wait_cluster(timeout=120, settle=False)
    retry = read_retry_file(env.tmp / "r.retry")
    res = deploy(retry, env.connect(), env.opts())
    assert res.exit_code == EXIT_OK and res.changed, res.render()
    assert not (env.tmp / "r.retry").exists()  # nothing failed: no stale retry file
    again = deploy(lab.nodes, env.connect(), env.opts())
    assert again.exit_code == EXIT_OK, again.render()
    assert not again.changed, again.render()
    for n in lab.nodes:
        assert lab.exec(n, ["/opt/dtake/venv/bin/dtake", "status"]).returncode == 0


def test_spec_error_reported_with_location_and_nothing_changed(env: Env) -> None:
    lab = env.lab

    def state() -> list[str]:
        cib = lab.exec("node1", ["cibadmin", "--query", "--scope", "configuration"]).stdout
        return [cib] + [lab.read_file(n, "/etc/corosync/corosync.conf") for n in lab.nodes]

    before = state()
    data = yaml.safe_load(env.spec_path.read_text())
    data["resources"][0]["owners"] = ["node1", "node7"]
    data["constraints"]["colocation"][0]["with"] = "nope"
    data["cluster"]["token_ms"] = "fast"
    (env.tmp / "bad.yaml").write_text(yaml.safe_dump(data))
    for playbook in ("cluster", "resources"):
        out = io.StringIO()
        with redirect_stdout(out):
            rc = main(
                [playbook, "--spec", str(env.tmp / "bad.yaml"), "--ssh-config", lab.ssh_config]
            )
        text = out.getvalue()
        assert rc == EXIT_SPEC, text
        assert "SPEC_UNKNOWN_NODE" in text and "$.resources[0].owners[1]" in text
        assert "SPEC_UNKNOWN_RESOURCE" in text and "$.constraints.colocation[0].with" in text
        assert "SPEC_SCHEMA" in text and "$.cluster.token_ms" in text
        assert "bad.yaml:" in text  # file:line
    assert state() == before


def test_cluster_and_resources_converge_then_second_run_changes_nothing(env: Env) -> None:
    lab = env.lab
    spec = env.spec
    c1 = cluster(spec, env.connect(), ClusterOptions())
    assert c1.exit_code == EXIT_OK, c1.render()
    r1 = resources(spec, env.connect(), ResourcesOptions())
    assert r1.exit_code == EXIT_OK and r1.changed, r1.render()

    def promoted() -> str | None:
        st = lab.cluster_status("node1")
        p = [
            n
            for r in st.resources
            if r.id.split(":")[0] == "data" and r.role == "Promoted"
            for n in r.nodes
        ]
        return p[0] if len(p) == 1 else None

    active = lab.wait_for(promoted, 120, interval=0.5, what="data promoted")
    lab.wait_for(
        lambda: lab.cluster_status("node1").running_on("app") == [active], 120, what="app group"
    )
    c2 = cluster(spec, env.connect(), ClusterOptions())
    r2 = resources(spec, env.connect(), ResourcesOptions())
    assert c2.exit_code == EXIT_OK and not c2.changed, c2.render()
    assert r2.exit_code == EXIT_OK and not r2.changed, r2.render()
    # check mode on a changed spec: reports the change, writes nothing
    data = yaml.safe_load(env.spec_path.read_text())
    data["resources"][2]["meta"] = {"resource-stickiness": 100}
    (env.tmp / "changed.yaml").write_text(yaml.safe_dump(data))
    before = lab.exec("node1", ["cibadmin", "--query", "--scope", "resources"]).stdout
    chk = resources(
        load_spec(env.tmp / "changed.yaml"), env.connect(), ResourcesOptions(check=True)
    )
    assert chk.changed and [t.name for t in chk.hosts[0].tasks if t.changed] == [
        "resource app-group"
    ]
    assert lab.exec("node1", ["cibadmin", "--query", "--scope", "resources"]).stdout == before


def test_verify_runs_the_infra_suites_on_every_node(env: Env) -> None:
    lab = env.lab
    lab.wait_cluster(timeout=120, settle=True)
    ctl = env.connect()("node1")  # the suites check the targets are OK: first mirror done
    try:
        wait_in_sync(ctl, 300)
    finally:
        ctl.close()
    o = VerifyOptions(ssh_config=lab.ssh_config, expect_nodes=lab.nodes, timeout=300)
    res = verify(lab.nodes, o)
    assert res.exit_code == EXIT_OK, res.render(verbose=True)
    for h in res.hosts:
        names = {t.name: t.status for t in h.tasks}
        assert names.get("test_service_is_supervised_and_running") == "ok", h.tasks
        assert names.get("test_replicated_disk_has_one_promoted_copy") == "ok", h.tasks
        assert names.get("test_ocf_agents_installed") == "ok", h.tasks
    # a key readable by others on node2: that check fails there, and only there
    lab.exec("node2", ["chmod", "0644", "/etc/dtake/authkey"])
    try:
        bad = verify(lab.nodes, o)
    finally:
        lab.exec("node2", ["chmod", "0600", "/etc/dtake/authkey"])
    assert bad.exit_code != EXIT_OK and bad.failed_hosts == ["node2"], bad.render()
    failed = [t.name for h in bad.hosts for t in h.tasks if t.status == "failed"]
    assert failed == ["test_auth_key_is_private"], bad.render()
    # no ssh master left behind by the multiplexed run
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "dtake-verify-" not in ps


def test_cli_deploy_json(env: Env) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(
            [
                "deploy",
                "--ssh-config",
                env.lab.ssh_config,
                "--hosts",
                "node1",
                "--ini",
                str(env.ini),
                "--wheelhouse",
                str(env.house),
                "--auth-key",
                str(env.key),
                "--json",
            ]
        )
    assert rc == EXIT_OK, out.getvalue()
    data = json.loads(out.getvalue())
    assert data["changed"] is False and data["hosts"][0]["host"] == "node1"
    assert "dtsetup service" in {t["name"] for t in data["hosts"][0]["tasks"]}


# ---------------------------------------------------------------- rolling upgrade [L503-507]
DTAKE = "/opt/dtake/venv/bin/dtake"


def _where(lab: Lab, via: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(nodes where ``data`` is promoted, nodes running ``app``); None: no crm_mon answer."""
    try:
        st = lab.cluster_status(via)
    except Exception:
        return None
    promoted = sorted(
        n
        for r in st.resources
        if r.id.split(":")[0] == "data" and r.active and r.role == "Promoted"
        for n in r.nodes
    )
    return tuple(promoted), tuple(sorted(st.running_on("app")))


def _promoted(lab: Lab, via: str) -> tuple[str, ...] | None:
    w = _where(lab, via)
    return None if w is None else w[0]


def _digest(lab: Lab, node: str) -> set[str]:
    out = lab.exec(node, "cd /srv/data && find . -type f -exec md5sum {} + | sort", timeout=60)
    return set(out.stdout.splitlines())


def _wait_idle(lab: Lab, node: str) -> None:
    st = json.loads(lab.exec(node, [DTAKE, "--json", "status"]).stdout)
    for c in st["connections"]:
        lab.exec(node, [DTAKE, "wait", str(c["id"]), "--idle", "--timeout", "90"], timeout=120)


class Sampler(threading.Thread):
    """Who holds the promoted copy (``samples``) and where the dependent app runs (``app``),
    sampled from crm_mon until stopped; with ``write``, each sample also writes a new file
    on the promoted node (an application writing all along): ``written`` holds the files
    whose write succeeded there."""

    def __init__(self, lab: Lab, via: str, *, write: bool = False) -> None:
        super().__init__(daemon=True)
        self.lab, self.via, self.write = lab, via, write
        self.samples: list[tuple[str, ...]] = []
        self.app: list[tuple[str, ...]] = []
        self.written: dict[str, str] = {}  # file -> node it was written on
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            w = _where(self.lab, self.via)
            p = None if w is None else w[0]
            if w is not None:
                self.samples.append(w[0])
                self.app.append(w[1])
            if self.write and p and len(p) == 1:
                i += 1
                name = f"/srv/data/during/w{i:04d}"
                r = self.lab.exec(
                    p[0], f"mkdir -p /srv/data/during && echo {name} > {name}", check=False
                )
                if r.returncode == 0:  # refused (read-only) on a copy demoted meanwhile
                    self.written[name] = p[0]
            self.halt.wait(0.3)

    def stop(self) -> list[tuple[str, ...]]:
        self.halt.set()
        self.join(60)
        return self.samples


def _runs(samples: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Consecutive equal samples collapsed: the sequence of states seen."""
    out: list[tuple[str, ...]] = []
    for s in samples:
        if not out or out[-1] != s:
            out.append(s)
    return out


def _sampled_upgrade(env: Env, house: Path) -> tuple[PlaybookResult, Sampler]:
    """The upgrade playbook to HOUSE, with who was promoted sampled, and a file written
    on the promoted copy at each sample, all along."""
    sampler = Sampler(env.lab, "node1", write=True)
    sampler.start()
    try:
        res = upgrade(env.lab.nodes, env.connect(), env.opts(wheelhouse=house))
    finally:
        sampler.stop()
    return res, sampler


def test_rolling_upgrade_to_a_newer_version(env: Env) -> None:
    """The seed's rolling upgrade [L503-507] from the deployed wheel to a newer one: every
    node ends on the new version, the replicated data stayed promoted on one node except
    for the single move to an upgraded node, nothing acknowledged was lost, and a second
    run changes nothing."""
    lab = env.lab
    lab.wait_cluster(timeout=120, settle=True)
    old = {
        n: json.loads(lab.exec(n, [DTAKE, "--json", "status"]).stdout)["version"] for n in lab.nodes
    }
    new_house = env.tmp / "house-new"
    new_version = bumped_wheelhouse(env.house, new_house, "upgrade1")
    assert set(old.values()) != {new_version}
    hold = lab.wait_for(
        lambda: p[0] if (p := _promoted(lab, "node1")) and len(p) == 1 else None,
        120,
        what="data promoted",
    )
    lab.exec(
        hold,
        "mkdir -p /srv/data/before && seq 1 200 | while read i; do "
        "echo before-$i > /srv/data/before/f$i; done && head -c 2000000 /dev/urandom > /srv/data/blob",
    )
    _wait_idle(lab, hold)
    acked = _digest(lab, hold)

    res, sampler = _sampled_upgrade(env, new_house)
    samples = sampler.samples
    assert res.exit_code == EXIT_OK, res.render(verbose=True)
    assert res.changed and not res.failed_hosts, res.render()
    for n in lab.nodes:
        st = json.loads(lab.exec(n, [DTAKE, "--json", "status"]).stdout)
        assert st["version"] == new_version, (n, st["version"])
    # availability: one promoted copy at every sample, but for the one move (demote on the
    # held node, promote on an upgraded one): hold -> [none] -> an upgraded node
    runs = _runs(samples)
    assert len(runs) in (2, 3) and runs[0] == (hold,), runs
    assert len(runs[-1]) == 1 and runs[-1] != (hold,), runs
    assert len(runs) == 2 or runs[1] == (), runs
    new_active = runs[-1][0]
    # the app group followed the promoted copy: on the held node, one gap, on the new one
    apps = _runs(sampler.app)
    assert apps[0] == (hold,) and apps[-1] == (new_active,), apps
    assert len(apps) == 2 or apps[1:-1] == [()], apps
    # no data lost: everything acknowledged before, and every file written on the promoted
    # copy during the roll (on the held node until the move, then on the new one), is on
    # every node byte for byte, with a write after the upgrade
    assert {n for n in sampler.written.values()} == {hold, new_active}, sampler.written
    lab.exec(new_active, "echo after-upgrade > /srv/data/after")
    _wait_idle(lab, new_active)
    want = _digest(lab, new_active)
    assert acked <= want
    during = {f"./during/{Path(f).name}" for f in sampler.written}
    have = {line.split(maxsplit=1)[1] for line in want}
    assert during <= have, sorted(during - have)
    for n in lab.nodes:
        got = lab.wait_for(
            lambda n=n: _digest(lab, n) == want or None, 120, what=f"/srv/data on {n}"
        )
        assert got
    # a second run finds every node on the new version and changes nothing
    again, sampler = _sampled_upgrade(env, new_house)
    assert again.exit_code == EXIT_OK and not again.changed, again.render(verbose=True)
    assert _runs(sampler.samples) == [(new_active,)]
    assert _runs(sampler.app) == [(new_active,)]

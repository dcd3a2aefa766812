"""The playbooks against a real 3-node lab: deploy (twice, and with a host unreachable),
cluster + resources from a spec (twice), spec errors, verify with testinfra.

One lab for the module; tests build on each other in file order.
"""

from __future__ import annotations

import io
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
from playbooks.recap import EXIT_OK, EXIT_SPEC, EXIT_UNREACHABLE, read_retry_file
from playbooks.remote import Connector, fabric_connector
from playbooks.resources import ResourcesOptions, resources
from playbooks.spec import ClusterSpec, load_spec
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
    before = lab.exec("node1", ["cibadmin", "--query"]).stdout
    data = yaml.safe_load(env.spec_path.read_text())
    data["resources"][0]["owners"] = ["node1", "node7"]
    data["constraints"]["colocation"][0]["with"] = "nope"
    (env.tmp / "bad.yaml").write_text(yaml.safe_dump(data))
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(
            ["resources", "--spec", str(env.tmp / "bad.yaml"), "--ssh-config", lab.ssh_config]
        )
    text = out.getvalue()
    assert rc == EXIT_SPEC, text
    assert "SPEC_UNKNOWN_NODE" in text and "$.resources[0].owners[1]" in text
    assert "SPEC_UNKNOWN_RESOURCE" in text and "$.constraints.colocation[0].with" in text
    assert "bad.yaml:" in text  # file:line
    assert lab.exec("node1", ["cibadmin", "--query"]).stdout == before


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
    res = verify(
        lab.nodes,
        VerifyOptions(ssh_config=lab.ssh_config, expect_nodes=lab.nodes, timeout=300),
    )
    assert res.exit_code == EXIT_OK, res.render(verbose=True)
    for h in res.hosts:
        names = {t.name: t.status for t in h.tasks}
        assert names.get("test_service_is_supervised_and_running") == "ok", h.tasks
        assert names.get("test_replicated_disk_has_one_promoted_copy") == "ok", h.tasks
        assert names.get("test_ocf_agents_installed") == "ok", h.tasks


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
    import json

    data = json.loads(out.getvalue())
    assert data["changed"] is False and data["hosts"][0]["host"] == "node1"
    assert "dtsetup service" in {t["name"] for t in data["hosts"][0]["tasks"]}

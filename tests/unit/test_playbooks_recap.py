"""Recap, retry file, the bounded pool, and deploy/corosync on scripted hosts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from playbooks import corosync
from playbooks.deploy import DeployOptions, deploy
from playbooks.recap import (
    CHANGED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    FAILED,
    OK,
    HostResult,
    PlaybookResult,
    read_retry_file,
    write_retry_file,
)
from playbooks.remote import HostTimeout, Remote, expand_limit, run_hosts
from playbooks.spec import parse_spec
from playbooks.testing import ScriptedRemote, converged_host, fresh_host, scripted_connector


def test_recap_line_and_exit_codes() -> None:
    a, b, c = HostResult("node1"), HostResult("node2"), HostResult("node3")
    a.add("x", OK)
    a.add("y", CHANGED, "did y")
    b.add("x", FAILED, "broke")
    c.unreachable = "connection refused"
    res = PlaybookResult("deploy", [a])
    assert res.exit_code == EXIT_OK and res.changed
    assert a.recap().split(":", 1)[1].strip() == "ok=1 changed=1 unreachable=0 failed=0 skipped=0"
    res.hosts.append(c)
    assert res.exit_code == EXIT_UNREACHABLE
    res.hosts.append(b)
    assert res.exit_code == EXIT_FAILED
    text = res.render()
    assert "failed hosts: node3, node2" in text
    assert "changed: [node1] y - did y" in text and "ok: [node1] x" not in text
    assert "ok: [node1] x" in res.render(verbose=True)
    data = json.loads(res.to_json())
    assert data["failed_hosts"] == ["node3", "node2"]
    assert data["hosts"][0]["recap"] == {"ok": 1, "changed": 1, "failed": 0, "skipped": 0}


def test_retry_file_written_read_and_removed_when_nothing_failed(tmp_path: Path) -> None:
    f = tmp_path / "site.retry"
    assert write_retry_file(f, ["node2", "node3"]) == str(f)
    assert read_retry_file(f) == ["node2", "node3"]
    assert expand_limit(["node1", "node2", "node3"], f"@{f}") == ["node2", "node3"]
    assert expand_limit(["node1", "node2"], "node2,node9") == ["node2", "node9"]
    assert write_retry_file(f, []) == "" and not f.exists()


def test_pool_is_bounded_and_one_broken_host_does_not_stop_the_others() -> None:
    live, peak = 0, 0
    lock = threading.Lock()

    def fn(remote: Remote, res: HostResult) -> None:
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        try:
            time.sleep(0.05)
            if remote.host == "h3":
                raise ValueError("bug on h3")
            if remote.host == "h4":
                raise HostTimeout("per-host timeout reached")
            res.add("work", CHANGED)
        finally:
            with lock:
                live -= 1

    hosts = [f"h{i}" for i in range(8)]
    remotes = {h: ScriptedRemote(h) for h in hosts if h != "h5"}
    results = run_hosts(hosts, scripted_connector(remotes), fn, forks=3)
    assert [r.host for r in results] == hosts  # input order
    assert peak <= 3
    by = {r.host: r for r in results}
    assert by["h3"].tasks[-1].status == FAILED and "ValueError: bug on h3" in by["h3"].tasks[-1].msg
    assert by["h4"].tasks[-1].name == "timeout"
    assert by["h5"].unreachable and not by["h5"].tasks
    assert all(by[h].changed for h in ("h0", "h1", "h2", "h6", "h7"))
    assert all(remotes[h].closed for h in remotes)


# ---------------------------------------------------------------------------- deploy
def _wheelhouse(tmp: Path) -> Path:
    house = tmp / "wh"
    house.mkdir()
    (house / "dtake-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
    return house


def _opts(tmp: Path) -> DeployOptions:
    ini = tmp / "DTSetup.ini"
    ini.write_text("[Config]\nDTACTIVATIONCODE=123456789012345678901234\n")
    key = tmp / "key"
    key.write_text("ab" * 32 + "\n")
    return DeployOptions(
        ini=ini, wheelhouse=_wheelhouse(tmp), auth_key=key, retry_file=tmp / "d.retry"
    )


def test_deploy_fresh_hosts_changes_then_a_converged_run_changes_nothing(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    remotes = {h: fresh_host(h) for h in ("node1", "node2")}
    res = deploy(["node1", "node2"], scripted_connector(remotes), o)
    assert res.exit_code == EXIT_OK and res.changed, res.render()
    n1 = remotes["node1"]
    assert n1.files[f"{o.workdir}/authkey"] == b"ab" * 32  # no newline: see deploy.py
    assert n1.ran(r"dtsetup apply /var/lib/dtake-deploy/DTSetup.ini --host node1 ")
    assert "put_bytes /var/lib/dtake-deploy/DTSetup.ini 600" in n1.calls
    assert not res.retry_file and not (tmp_path / "d.retry").exists()
    again = {h: converged_host(h, o) for h in ("node1", "node2")}
    res2 = deploy(["node1", "node2"], scripted_connector(again), o)
    assert res2.exit_code == EXIT_OK and not res2.changed, res2.render()
    assert not any(c.startswith("put") for r in again.values() for c in r.calls)
    assert not any(r.unexpected for r in again.values())


def test_deploy_one_host_unreachable_others_done_retry_file_written(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    remotes = {h: fresh_host(h) for h in ("node1", "node3")}
    res = deploy(["node1", "node2", "node3"], scripted_connector(remotes), o)
    by = {h.host: h for h in res.hosts}
    assert by["node2"].unreachable and not by["node1"].failed and not by["node3"].failed
    assert res.exit_code == EXIT_UNREACHABLE
    assert read_retry_file(tmp_path / "d.retry") == ["node2"]
    assert "retry with: --limit @" in res.render()


def test_deploy_dtsetup_failure_is_reported_with_its_codes(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    bad = fresh_host("node1")
    report = {
        "steps": [
            {"name": "service", "status": "failed", "summary": "start"},
            {"name": "config", "status": "rolled_back", "summary": "x"},
        ],
        "reports": [{"code": "STEP_FAILED", "severity": "error", "message": "not ready"}],
    }
    bad.rules = [r for r in bad.rules if "dtsetup" not in r.pattern]
    bad.script(r"bin/dtsetup apply", rc=1, stdout=json.dumps(report))
    res = deploy(["node1"], scripted_connector({"node1": bad}), o)
    assert res.exit_code == EXIT_FAILED
    msgs = [t.msg for t in res.hosts[0].tasks if t.status == FAILED]
    assert "STEP_FAILED: not ready" in msgs and "rolled_back: x" in msgs


def test_deploy_check_mode_writes_nothing(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    o.check = True
    r = fresh_host("node1")
    res = deploy(["node1"], scripted_connector({"node1": r}), o)
    assert res.changed
    assert not r.ran(r"^put|mkdir|venv|dtsetup apply")


# ---------------------------------------------------------------------------- corosync
LAB_CONF = """# generated by dtake lab/
totem {
    version: 2
    cluster_name: dtl
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 1000
}
nodelist {
    node {
        name: node1
        nodeid: 1
        ring0_addr: 10.0.0.1
    }
    node {
        name: node2
        nodeid: 2
        ring0_addr: 10.0.0.2
    }
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_logfile: yes
}
"""

SPEC2 = """
version: 1
cluster:
  name: dtl
  token_ms: 1000
  crypto: false
  nodes:
    - {name: node1, addrs: [10.0.0.1]}
    - {name: node2, addrs: [10.0.0.2]}
  quorum: {two_node: true}
"""


def test_an_existing_corosync_conf_that_says_what_the_spec_says_is_left_alone() -> None:
    assert corosync.converge(LAB_CONF, parse_spec(SPEC2)) == (None, [])


def test_corosync_conf_changes_only_governed_keys_and_keeps_the_rest() -> None:
    s = parse_spec(
        SPEC2.replace("token_ms: 1000", "token_ms: 3000").replace("10.0.0.2]", "10.0.0.22]")
    )
    new, keys = corosync.converge(LAB_CONF, s)
    assert keys == ["nodelist.node2.ring0_addr", "totem.token"]
    assert new is not None
    tree = corosync.parse(new)
    assert tree.section("totem").get("token") == "3000"
    assert tree.section("logging").get("to_logfile") == "yes"
    assert corosync.converge(new, s) == (None, [])
    assert not set(keys) & set(corosync.RESTART_KEYS)


def test_corosync_conf_from_nothing() -> None:
    new, keys = corosync.converge(None, parse_spec(SPEC2))
    assert new is not None and "totem.cluster_name" in keys
    assert corosync.converge(new, parse_spec(SPEC2)) == (None, [])


@pytest.mark.parametrize("name", ["node1"])
def test_scripted_remote_refuses_unscripted_commands(name: str) -> None:
    r = ScriptedRemote(name)
    assert r.run("rm -rf /").rc == 127 and r.unexpected == ["rm -rf /"]

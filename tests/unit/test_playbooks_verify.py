"""verify: the multiplexing ssh_config, one pytest per host, JUnit cases -> host tasks."""

from __future__ import annotations

from pathlib import Path

from playbooks.recap import FAILED, OK, SKIPPED, HostResult
from playbooks.verify import VerifyOptions, _collect, mux_ssh_config, pytest_argv


def test_mux_config_multiplexes_then_includes_the_users_config(tmp_path: Path) -> None:
    user = tmp_path / "lab_ssh_config"
    user.write_text("Host node1\n    HostName 10.0.0.1\n")
    cfg = Path(mux_ssh_config(str(tmp_path), str(user))).read_text().splitlines()
    assert cfg[1:5] == [
        "Host *",
        f"    ControlPath {tmp_path}/cm-%C",
        "    ControlMaster auto",
        "    ControlPersist 120",
    ]
    assert cfg[-1] == f"Include {user}"  # after ours: the first value obtained wins


def test_one_host_per_pytest_with_the_mux_config() -> None:
    o = VerifyOptions(ssh_config="/lab/ssh_config", expect_nodes=["n1", "n2"])
    argv = pytest_argv(["n1"], o, "/tmp/j.xml", ssh_config="/tmp/mux/ssh_config")
    assert "--hosts=ssh://n1" in argv
    assert "--ssh-config=/tmp/mux/ssh_config" in argv
    assert "--dtake-nodes=n1,n2" in argv and "--dtake-cluster" in argv
    assert "--hosts=paramiko://n2" in pytest_argv(["paramiko://n2"], o, "/tmp/j.xml")


def test_junit_cases_become_the_hosts_tasks(tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="test_node" name="test_a[ssh://n1]"/>'
        '<testcase classname="test_node" name="test_b[ssh://n1]">'
        '<failure message="AssertionError: key mode 0o644&#10;more">tb</failure></testcase>'
        '<testcase classname="test_node" name="test_c[ssh://n1]">'
        '<skipped message="not requested"/></testcase>'
        '<testcase classname="test_node" name="test_d[ssh://n1]">'
        '<error message="fixture failed">tb</error></testcase>'
        "</testsuite></testsuites>"
    )
    res = HostResult("n1")
    _collect(str(junit), res)
    assert [(t.name, t.status, t.msg) for t in res.tasks] == [
        ("test_a", OK, ""),
        ("test_b", FAILED, "AssertionError: key mode 0o644"),
        ("test_c", SKIPPED, "not requested"),
        ("test_d", FAILED, "fixture failed"),
    ]

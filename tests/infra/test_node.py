"""Node checks: the dtake service is installed, configured safely, running and answering.

The config, the service status, the dtsetup record and the attributes of the files come
from module-scoped fixtures (conftest.py): a host is asked each of them once.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

# pytest puts this directory on sys.path (rootdir-less conftest); mypy, checking the
# packaged copy playbooks/infra, cannot see that
from infra_facts import AGENT_DIR, AGENTS, RECORD, Stat, config_paths  # type: ignore[import-not-found]


def _stat(stats: dict[str, Stat], path: str) -> Stat:
    st = stats.get(path)
    assert st is not None, f"{path} is missing"
    return st


def test_dtake_command_runs(host: Any, dtake_target: Any) -> None:
    out = host.run(f"{dtake_target.dtake_bin} --help")
    assert out.rc == 0, out.stderr
    assert "replication" in out.stdout


def test_config_is_valid(dtake_config: dict[str, Any]) -> None:
    port = int(dtake_config.get("port", 6320))
    assert 1025 <= port <= 65535
    for key in ("state_dir", "control_socket", "auth_key_file"):
        if key in dtake_config:
            assert str(dtake_config[key]).startswith("/"), f"{key} must be absolute"


def test_auth_key_is_private(
    host: Any, dtake_config: dict[str, Any], stats: dict[str, Stat]
) -> None:
    path = config_paths(dtake_config)["auth_key_file"]
    st = _stat(stats, path)
    assert st.mode & 0o077 == 0, f"key mode {oct(st.mode)}: must not be readable by group/others"
    out = host.run("cat %s", path)
    assert out.rc == 0 and len(out.stdout.strip()) == 64


def test_service_listens_on_its_port(host: Any, dtake_config: dict[str, Any]) -> None:
    # one `ss` (testinfra's host.socket probes the OS first: six commands)
    port = int(dtake_config.get("port", 6320))
    bind = str(dtake_config.get("bind", "0.0.0.0"))
    out = host.run("ss -Hltn")
    assert out.rc == 0, out.stderr
    local = {line.split()[3] for line in out.stdout.splitlines() if len(line.split()) > 3}
    wanted = {f"{bind}:{port}", f"[{bind}]:{port}"}
    if bind in ("0.0.0.0", "::"):
        wanted |= {f"*:{port}", f"0.0.0.0:{port}", f"[::]:{port}"}
    assert local & wanted, f"nothing listens on {bind}:{port} ({sorted(local)})"


def test_service_answers_on_control_socket(
    dtake_config: dict[str, Any], stats: dict[str, Stat], dtake_status: dict[str, Any]
) -> None:
    sock = config_paths(dtake_config)["control_socket"]
    assert _stat(stats, sock).kind == "socket"
    if "node_name" in dtake_config:
        assert dtake_status["node"] == dtake_config["node_name"]
    for conn in dtake_status["connections"]:
        assert conn["state"] in ("Started", "Stopped", "Paused", "Scheduled", "Error")


def test_state_dir_not_world_readable(dtake_config: dict[str, Any], stats: dict[str, Stat]) -> None:
    st = _stat(stats, config_paths(dtake_config)["state_dir"])
    assert st.kind == "directory"
    assert st.mode & 0o007 == 0


def test_ocf_agents_installed(host: Any, dtake_target: Any, stats: dict[str, Stat]) -> None:
    if not dtake_target.agents:
        pytest.skip("agents not requested (--dtake-agents)")
    paths = [f"{AGENT_DIR}/{agent}" for agent in AGENTS]
    for path in paths:
        assert _stat(stats, path).mode & 0o111, f"{path} is not executable"
    out = host.run(" && ".join(["OCF_ROOT=/usr/lib/ocf %s meta-data"] * len(paths)), *paths)
    assert out.rc == 0, out.stderr
    assert out.stdout.count("<resource-agent ") == len(paths), out.stdout[:300]


# ---------------------------------------------------------------- installed hosts (dtsetup)
def test_dtsetup_record_is_private(dtsetup_record: dict[str, Any], stats: dict[str, Stat]) -> None:
    mode = _stat(stats, RECORD).mode
    assert mode & 0o077 == 0, f"dtsetup record mode {oct(mode)}: holds settings, keep it 0600"


def test_dtake_version(dtake_target: Any, dtake_status: dict[str, Any]) -> None:
    version = str(dtake_status["version"])
    if dtake_target.version:
        assert version == dtake_target.version
    else:
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", version), version


def test_service_is_supervised_and_running(host: Any, dtsetup_record: dict[str, Any]) -> None:
    init = (dtsetup_record.get("installed") or {}).get("init", "none")
    if init == "systemd":
        svc = host.service("dtake")
        assert svc.is_running and svc.is_enabled
    elif init == "supervisor":
        folder = str((dtsetup_record.get("settings") or {}).get("DOUBLETAKEFOLDER", "/opt/dtake"))
        out = host.run(f"{folder}/libexec/dtake-supervisor status --pidfile /run/dtake/dtake.pid")
        assert out.rc == 0, f"dtake-supervisor status: {out.stdout}{out.stderr}"
    else:
        pytest.skip(f"installed without a service (init {init})")


def test_firewall_rule_for_the_service_port(
    host: Any, dtsetup_record: dict[str, Any], dtake_config: dict[str, Any]
) -> None:
    fw = (dtsetup_record.get("installed") or {}).get("firewall")
    if not fw:
        pytest.skip("SET_FWPORT=N: no firewall rule managed")
    port, backend = int(fw["port"]), fw["backend"]
    assert port == int(dtake_config.get("port", 6320))
    if backend == "nftables":
        out = host.check_output("nft list table inet dtake")
        assert f"tcp dport {port} accept" in out
    elif backend == "firewalld":
        assert f"{port}/tcp" in host.check_output("firewall-cmd --list-ports")
    elif backend == "ufw":
        assert f"{port}/tcp" in host.check_output("ufw status")
    else:
        pytest.fail(f"unknown firewall backend {backend}")


def test_admin_and_monitor_groups_exist(
    host: Any, dtsetup_record: dict[str, Any], dtake_config: dict[str, Any]
) -> None:
    groups = [
        dtake_config.get("admin_group", "dtadmin"),
        dtake_config.get("monitor_group", "dtmon"),
    ]
    out = host.run("getent group " + " ".join(["%s"] * len(groups)), *groups)
    found = {line.split(":", 1)[0] for line in out.stdout.splitlines()}
    missing = [g for g in groups if g not in found]
    assert not missing, f"groups missing: {missing}"


def test_config_not_writable_by_others(dtake_target: Any, stats: dict[str, Stat]) -> None:
    mode = _stat(stats, dtake_target.config).mode
    assert mode & 0o022 == 0, f"{dtake_target.config} mode {oct(mode)}"

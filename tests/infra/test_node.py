"""Node checks: the dtake service is installed, configured safely, running and answering."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml


def _config(host: Any, target: Any) -> dict[str, Any]:
    f = host.file(target.config)
    assert f.exists, f"{target.config} is missing"
    data = yaml.safe_load(f.content_string) or {}
    assert isinstance(data, dict)
    return data


def test_dtake_command_runs(host: Any, dtake_target: Any) -> None:
    out = host.run(f"{dtake_target.dtake_bin} --help")
    assert out.rc == 0, out.stderr
    assert "replication" in out.stdout


def test_config_is_valid(host: Any, dtake_target: Any) -> None:
    cfg = _config(host, dtake_target)
    port = int(cfg.get("port", 6320))
    assert 1025 <= port <= 65535
    for key in ("state_dir", "control_socket", "auth_key_file"):
        if key in cfg:
            assert str(cfg[key]).startswith("/"), f"{key} must be absolute"


def test_auth_key_is_private(host: Any, dtake_target: Any) -> None:
    cfg = _config(host, dtake_target)
    key = host.file(cfg.get("auth_key_file", "/etc/dtake/authkey"))
    assert key.exists
    assert key.mode & 0o077 == 0, f"key mode {oct(key.mode)}: must not be readable by group/others"
    assert len(key.content_string.strip()) == 64


def test_service_listens_on_its_port(host: Any, dtake_target: Any) -> None:
    cfg = _config(host, dtake_target)
    port = int(cfg.get("port", 6320))
    bind = cfg.get("bind", "0.0.0.0")
    assert host.socket(f"tcp://{bind}:{port}").is_listening


def test_service_answers_on_control_socket(host: Any, dtake_target: Any) -> None:
    cfg = _config(host, dtake_target)
    sock = cfg.get("control_socket", "/run/dtake/dtake.sock")
    assert host.file(sock).is_socket
    out = host.run(f"{dtake_target.dtake_bin} --socket {sock} --json status")
    assert out.rc == 0, out.stderr
    status = json.loads(out.stdout)
    if "node_name" in cfg:
        assert status["node"] == cfg["node_name"]
    for conn in status["connections"]:
        assert conn["state"] in ("Started", "Stopped", "Paused", "Scheduled", "Error")


def test_state_dir_not_world_readable(host: Any, dtake_target: Any) -> None:
    cfg = _config(host, dtake_target)
    d = host.file(cfg.get("state_dir", "/var/lib/dtake"))
    assert d.is_directory
    assert d.mode & 0o007 == 0


def test_ocf_agents_installed(host: Any, dtake_target: Any) -> None:
    if not dtake_target.agents:
        import pytest

        pytest.skip("agents not requested (--dtake-agents)")
    for agent in ("SourceConnection", "ReplicatedDisk"):
        f = host.file(f"/usr/lib/ocf/resource.d/dtake/{agent}")
        assert f.exists and f.mode & 0o111
        out = host.run(f"OCF_ROOT=/usr/lib/ocf {f.path} meta-data")
        assert out.rc == 0 and "<resource-agent" in out.stdout


# ---------------------------------------------------------------- installed hosts (dtsetup)
def _status(host: Any, target: Any) -> dict[str, Any]:
    cfg = _config(host, target)
    sock = cfg.get("control_socket", "/run/dtake/dtake.sock")
    out = host.run(f"{target.dtake_bin} --socket {sock} --json status")
    assert out.rc == 0, out.stderr
    data = json.loads(out.stdout)
    assert isinstance(data, dict)
    return data


def _record(host: Any, target: Any) -> dict[str, Any]:
    import pytest

    if not target.installed:
        pytest.skip("local service: not installed by dtsetup (run with --hosts)")
    f = host.file("/etc/dtake/dtsetup.json")
    assert f.exists, "/etc/dtake/dtsetup.json missing: not installed by dtsetup"
    assert f.mode & 0o077 == 0, f"dtsetup record mode {oct(f.mode)}: holds settings, keep it 0600"
    data = json.loads(f.content_string)
    assert isinstance(data, dict)
    return data


def test_dtake_version(host: Any, dtake_target: Any) -> None:
    version = str(_status(host, dtake_target)["version"])
    if dtake_target.version:
        assert version == dtake_target.version
    else:
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", version), version


def test_service_is_supervised_and_running(host: Any, dtake_target: Any) -> None:
    record = _record(host, dtake_target)
    init = (record.get("installed") or {}).get("init", "none")
    if init == "systemd":
        svc = host.service("dtake")
        assert svc.is_running and svc.is_enabled
    elif init == "supervisor":
        folder = str((record.get("settings") or {}).get("DOUBLETAKEFOLDER", "/opt/dtake"))
        out = host.run(f"{folder}/libexec/dtake-supervisor status --pidfile /run/dtake/dtake.pid")
        assert out.rc == 0, f"dtake-supervisor status: {out.stdout}{out.stderr}"
    else:
        import pytest

        pytest.skip(f"installed without a service (init {init})")


def test_firewall_rule_for_the_service_port(host: Any, dtake_target: Any) -> None:
    import pytest

    fw = (_record(host, dtake_target).get("installed") or {}).get("firewall")
    if not fw:
        pytest.skip("SET_FWPORT=N: no firewall rule managed")
    port, backend = int(fw["port"]), fw["backend"]
    assert port == int(_config(host, dtake_target).get("port", 6320))
    if backend == "nftables":
        out = host.check_output("nft list table inet dtake")
        assert f"tcp dport {port} accept" in out
    elif backend == "firewalld":
        assert f"{port}/tcp" in host.check_output("firewall-cmd --list-ports")
    elif backend == "ufw":
        assert f"{port}/tcp" in host.check_output("ufw status")
    else:
        pytest.fail(f"unknown firewall backend {backend}")


def test_admin_and_monitor_groups_exist(host: Any, dtake_target: Any) -> None:
    _record(host, dtake_target)
    cfg = _config(host, dtake_target)
    for group in (cfg.get("admin_group", "dtadmin"), cfg.get("monitor_group", "dtmon")):
        assert host.group(group).exists, f"group {group} missing"


def test_config_not_writable_by_others(host: Any, dtake_target: Any) -> None:
    f = host.file(dtake_target.config)
    assert f.mode & 0o022 == 0, f"{dtake_target.config} mode {oct(f.mode)}"

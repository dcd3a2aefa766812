"""Node checks: the dtake service is installed, configured safely, running and answering."""

from __future__ import annotations

import json
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

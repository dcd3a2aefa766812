"""Real software install (venv + offline pip) and the supervisor with a running service,
checked with pytest-testinfra; the silent command line through a real shell."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra

from dtsetup import actions

REPO = Path(__file__).resolve().parents[3]
DTSETUP = Path(sys.executable).parent / "dtsetup"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def host() -> Any:
    return testinfra.get_host("local://")


@pytest.fixture
def supervised_root(root: Path) -> Iterator[Path]:
    yield root
    # whatever happened, stop a supervisor this test started (by its own pidfile)
    pidfile = root / "run/dtake/dtake.pid"
    if pidfile.exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "dtsetup/supervisor.py"),
                "stop",
                "--pidfile",
                str(pidfile),
            ],
            check=False,
        )


def test_supervisor_runs_service_and_uninstall_stops_it(
    supervised_root: Path,
    ini: Callable[..., Path],
    fake_wheelhouse: Path,
    host: Any,
    snapshot: Callable[[Path], dict[str, tuple[int, str]]],
) -> None:
    root = supervised_root
    empty = snapshot(root)
    port = free_port()
    o = actions.ApplyOptions(
        host="node1",
        root=root,
        wheelhouse=fake_wheelhouse,
        init="supervisor",
        agents_dir=root.parent / "agents",
    )
    first = actions.apply(ini(PORT=str(port)), o)
    assert first.exit_code == 2, (first.reports, first.steps)
    assert {s.name: s.status for s in first.steps}["software"] == "changed"
    pidfile = root / "run/dtake/dtake.pid"
    assert host.file(str(pidfile)).exists
    pid = int(pidfile.read_text())
    assert host.process.get(pid=pid) is not None
    assert host.socket(f"tcp://0.0.0.0:{port}").is_listening
    assert host.file(str(root / "etc/dtake/authkey")).mode == 0o600
    assert host.file(str(root / "opt/dtake/libexec/dtake-supervisor")).mode == 0o755
    assert "DTAKE_AUTOSTART=yes" in host.file(str(root / "etc/default/dtake")).content_string

    again = actions.apply(ini(PORT=str(port)), o)
    assert again.exit_code == 0, again.steps
    assert int(pidfile.read_text()) == pid

    # a new port: config changes, the running service is restarted on it
    new_port = free_port()
    moved = actions.apply(ini(PORT=str(new_port)), o)
    assert moved.exit_code == 2
    assert "restart dtake (supervisor)" in {s.name: s.summary for s in moved.steps}["service"]
    assert host.socket(f"tcp://0.0.0.0:{new_port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening

    gone = actions.uninstall(root=root)
    assert gone.exit_code == 2, gone.reports
    assert not pidfile.exists()
    assert not host.socket(f"tcp://0.0.0.0:{new_port}").is_listening
    assert snapshot(root) == empty


def test_silent_command_line_verbatim(
    root: Path, ini: Callable[..., Path], fake_wheelhouse: Path
) -> None:
    path = ini()
    # the seed's layout: the install files (here a wheelhouse) beside DTSetup.ini [L684]
    (path.parent / "wheelhouse").symlink_to(fake_wheelhouse)
    line = f'{DTSETUP} /s /v"DTSETUPINI=\\"{path}\\" /qn"'
    env = os.environ | {"DTSETUP_ROOT": str(root), "DTSETUP_HOST": "node1"}
    first = subprocess.run(
        ["bash", "-c", line], env=env, capture_output=True, text=True, check=False
    )
    assert first.returncode == 2, first.stderr
    assert first.stdout == ""  # /qn: no output unless something fails
    assert (root / "opt/dtake/venv/bin/dtake").exists()
    assert (root / "etc/dtake/dtake.yaml").exists()
    second = subprocess.run(
        ["bash", "-c", line], env=env, capture_output=True, text=True, check=False
    )
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    broken = line.replace(" /qn", "  /qn")
    bad = subprocess.run(
        ["bash", "-c", broken], env=env, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1 and "SILENT_SYNTAX" in bad.stderr
    assert shlex.split(line)[1] == "/s"


@pytest.mark.slow
def test_real_wheel_of_this_repo_installs_offline(
    root: Path, ini: Callable[..., Path], repo_wheelhouse: Path
) -> None:
    """The real path: ``pip wheel`` of this repo and its dependencies into a wheelhouse,
    then apply installs it with ``pip --no-index`` (no registry access on the node)."""
    o = actions.ApplyOptions(host="node1", root=root, wheelhouse=repo_wheelhouse, init="none")
    result = actions.apply(ini(), o)
    assert result.exit_code == 2, (result.reports, result.steps)
    venv = root / "opt/dtake/venv"
    check = subprocess.run(
        [str(venv / "bin/python"), "-c", "import dtake, dtsetup.cli, yaml, jsonschema"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    version = subprocess.run(
        [str(venv / "bin/dtsetup"), "--version"], capture_output=True, text=True, check=False
    )
    assert version.stdout.strip() == "dtsetup 0.1.0"
    assert actions.apply(ini(), o).exit_code == 0

"""apply into --root temp dirs with the real tools (groupadd --prefix): files and modes,
idempotence, atomic rollback, uninstall, agents."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from dtsetup import actions
from dtsetup.steps.base import Change, Context, Step
from dtsetup.txn import Transaction

Snap = Callable[[Path], dict[str, tuple[int, str]]]


def opts(root: Path, **kw: Any) -> actions.ApplyOptions:
    base: dict[str, Any] = {
        "host": "node1",
        "root": root,
        "no_software": True,
        "agents_dir": root.parent / "agents",
        "init": "systemd-offline",
    }
    return actions.ApplyOptions(**(base | kw))


def test_apply_files_modes_and_second_apply_unchanged(
    root: Path, ini: Callable[..., Path], snapshot: Snap, code: str
) -> None:
    path = ini(PORT="6400", DISKQUEUEMAXSIZE="4096")
    first = actions.apply(path, opts(root))
    assert first.exit_code == 2, first.reports
    etc = root / "etc/dtake"
    key = (etc / "authkey").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", key)
    assert (etc / "authkey").stat().st_mode & 0o777 == 0o600
    assert (etc / "dtsetup.json").stat().st_mode & 0o777 == 0o600
    assert (etc / "dtake.yaml").stat().st_mode & 0o777 == 0o644
    config = yaml.safe_load((etc / "dtake.yaml").read_text())
    assert config == {
        "bind": "0.0.0.0",
        "port": 6400,
        "state_dir": "/var/lib/dtake",
        "control_socket": "/run/dtake/dtake.sock",
        "auth_key_file": "/etc/dtake/authkey",
        "admin_group": "dtadmin",
        "monitor_group": "dtmon",
        "queue": {
            "memory_max_mb": 128,
            "disk_folder": "/var/lib/dtake/queue",
            "disk_max_mb": 4096,
            "disk_free_min_mb": 50,
        },
    }
    groups = (root / "etc/group").read_text()
    assert re.search(r"^dtadmin:x:\d+:$", groups, re.M) and re.search(
        r"^dtmon:x:\d+:$", groups, re.M
    )
    assert (root / "var/lib/dtake/queue").is_dir()
    assert os.readlink(root / "etc/systemd/system/multi-user.target.wants/dtake.service") == (
        "/etc/systemd/system/dtake.service"
    )
    before = snapshot(root)
    second = actions.apply(path, opts(root))
    assert second.exit_code == 0 and second.count("changed") == 0, second.steps
    assert snapshot(root) == before
    assert (etc / "authkey").read_text() == key  # never rotated by a rerun
    assert code in (etc / "dtsetup.json").read_text()


class Boom:
    """A step that fails when applied: the failure injected midway."""

    name = "boom"

    def plan(self, ctx: Context) -> Change:
        return Change(changed=True, summary="explode")

    def apply(self, ctx: Context, txn: Transaction) -> None:
        raise RuntimeError("injected failure")

    def installed(self, ctx: Context) -> dict[str, Any]:
        return {}


def inject(steps: list[Step]) -> list[Step]:
    return [*steps, Boom()]  # after folders, groups, config, key, agents, service


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-an-install"])
def test_failure_midway_leaves_host_as_it_was(
    root: Path, ini: Callable[..., Path], existing: bool, snapshot: Snap
) -> None:
    agents = root.parent / "agents"
    agents.mkdir()
    (agents / "ReplicatedDisk").write_text("#!/usr/bin/env python3\nprint('x')\n")
    (agents / "ReplicatedDisk").chmod(0o755)
    if existing:
        assert actions.apply(ini(), opts(root)).exit_code == 2
        (agents / "SourceConnection").write_text("#!/bin/sh\nexit 0\n")
    before = snapshot(root)
    result = actions.apply(ini(PORT="7000", DTSERVICESTARTUP="N"), opts(root, steps_hook=inject))
    assert result.exit_code == 1
    assert [str(r.code) for r in result.reports if r.is_error] == ["STEP_FAILED"]
    assert "rolled_back" in [s.status for s in result.steps]
    assert snapshot(root) == before


def test_uninstall_leaves_nothing_behind(
    root: Path, ini: Callable[..., Path], snapshot: Snap
) -> None:
    agents = root.parent / "agents"
    agents.mkdir()
    (agents / "SourceConnection").write_text("#!/bin/sh\nexit 0\n")
    before = snapshot(root)
    assert actions.apply(ini(), opts(root)).exit_code == 2
    check = actions.uninstall(root=root, check=True)
    assert check.exit_code == 2 and (root / "etc/dtake/dtsetup.json").exists()
    result = actions.uninstall(root=root)
    assert result.exit_code == 2, result.reports
    assert snapshot(root) == before
    assert actions.uninstall(root=root).exit_code == 0


def test_agents_installed_with_venv_interpreter_and_stale_removed(
    root: Path, ini: Callable[..., Path]
) -> None:
    agents = root.parent / "agents"
    (agents / "lib").mkdir(parents=True)
    (agents / "ReplicatedDisk").write_text("#!/usr/bin/env python3\nimport sys\n")
    (agents / "ReplicatedDisk").chmod(0o755)
    (agents / "Old").write_text("#!/bin/sh\n")
    (agents / "Old").chmod(0o755)
    (agents / "lib" / "common.py").write_text("X = 1\n")
    (agents / "__pycache__").mkdir()
    (agents / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert actions.apply(ini(DOUBLETAKEFOLDER='"/srv/dt"'), opts(root)).exit_code == 2
    ocf = root / "usr/lib/ocf/resource.d/dtake"
    rd = ocf / "ReplicatedDisk"
    assert rd.read_text().splitlines()[0] == "#!/srv/dt/venv/bin/python"
    assert rd.stat().st_mode & 0o777 == 0o755
    assert (ocf / "lib/common.py").stat().st_mode & 0o777 == 0o644
    assert not (ocf / "__pycache__").exists()
    (agents / "Old").unlink()
    result = actions.apply(ini(DOUBLETAKEFOLDER='"/srv/dt"'), opts(root))
    assert [s.summary for s in result.steps if s.name == "agents"] == [
        "remove /usr/lib/ocf/resource.d/dtake/Old"
    ]
    assert not (ocf / "Old").exists()


def test_provided_auth_key(root: Path, ini: Callable[..., Path], tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("ab" * 32)  # without the newline: accepted, stored with it
    assert actions.apply(ini(), opts(root, auth_key_file=key)).exit_code == 2
    assert (root / "etc/dtake/authkey").read_text() == "ab" * 32 + "\n"
    key.write_text("not a key\n")
    bad = actions.apply(ini(), opts(root, auth_key_file=key))
    assert bad.exit_code == 1 and [str(r.code) for r in bad.reports if r.is_error] == [
        "BAD_AUTH_KEY"
    ]


def test_invalid_input_changes_nothing(
    root: Path, ini: Callable[..., Path], snapshot: Snap
) -> None:
    before = snapshot(root)
    result = actions.apply(ini(PORT="80", Colour="blue"), opts(root))
    assert result.exit_code == 1 and result.steps == []
    assert sorted(str(r.code) for r in result.reports if r.is_error) == ["BAD_VALUE", "UNKNOWN_KEY"]
    assert snapshot(root) == before

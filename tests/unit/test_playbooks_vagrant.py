"""vagrant/ without a hypervisor: the Vagrantfile's structure (evaluated by ruby against a
stub Vagrant when ruby is installed), and the inputs it hands to the playbooks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from playbooks.spec import load_spec

VAGRANT = Path(__file__).resolve().parents[2] / "vagrant"


def test_vagrantfile_names_both_providers_the_box_and_the_playbooks() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    for needle in (
        ":libvirt",
        ":virtualbox",
        "debian/bookworm64",
        "run-playbooks.sh",
        'Vagrant.configure("2")',
    ):
        assert needle in text
    script = (VAGRANT / "run-playbooks.sh").read_text()
    for playbook in ("deploy", "cluster", "resources", "verify"):
        assert f"pb {playbook} " in script
    assert (VAGRANT / "run-playbooks.sh").stat().st_mode & 0o111


def test_vagrant_cluster_spec_and_ini_are_valid() -> None:
    spec = load_spec(VAGRANT / "cluster.yaml")
    assert spec.node_names == ["node1", "node2", "node3"]
    assert any(r.get("type") == "ReplicatedDisk" for r in spec.resources)
    from dtsetup.cli import main as dtsetup_main

    assert dtsetup_main(["validate", str(VAGRANT / "DTSetup.ini"), "--host", "node1"]) == 0


def _evaluate(tmp: Path, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    ruby = shutil.which("ruby")
    if ruby is None:
        msg = "ruby not installed (apt-get install ruby, or make deps): Vagrantfile not evaluated"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)  # CI must check the Vagrantfile, not skip it
        pytest.skip(msg)
    work = tmp / "vagrant"
    work.mkdir()
    shutil.copy(VAGRANT / "Vagrantfile", work / "Vagrantfile")
    r = subprocess.run(
        [ruby, str(VAGRANT / "test" / "stub_vagrant.rb"), str(work / "Vagrantfile")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), **(env or {})},
    )
    assert r.returncode == 0, r.stderr
    calls: list[dict[str, Any]] = json.loads(r.stdout)
    return calls


def test_vagrantfile_evaluates_to_three_debian_nodes_with_addresses(tmp_path: Path) -> None:
    calls = _evaluate(tmp_path)
    sets = {c["path"]: c.get("value") for c in calls if "value" in c}
    assert sets["config.vm.box"] == "debian/bookworm64"
    defined = [c["args"][0] for c in calls if c["path"] == "config.vm.define"]
    assert defined == ["node1", "node2", "node3"]
    nets = [c for c in calls if c["path"].endswith(".vm.network")]
    assert [c["kw"]["ip"] for c in nets] == ["192.168.56.11", "192.168.56.12", "192.168.56.13"]
    assert any(p.startswith("config.vm.provider(libvirt).memory") for p in sets)
    assert any(p.startswith("config.vm.provider(virtualbox).memory") for p in sets)
    # the playbooks run once, after the last node, from the host
    runs = [c for c in calls if c["path"].endswith(".run")]
    assert len(runs) == 1 and "define(node3)" in runs[0]["path"]
    path, args = runs[0]["value"]["path"], runs[0]["value"]["args"]
    assert path.endswith("run-playbooks.sh") and args[1] == "node1,node2,node3"
    ssh_config = Path(args[0]).read_text()
    assert "Host node2" in ssh_config and "HostName 192.168.56.12" in ssh_config
    assert "User root" in ssh_config
    key = Path(args[0]).parent / "id_ed25519"
    assert key.exists() and key.stat().st_mode & 0o077 == 0
    shell = next(c for c in calls if c["path"].endswith(".vm.provision"))
    assert shell["args"][0] == "shell"
    inline = shell["kw"]["inline"]
    assert "pacemaker" in inline and "systemctl disable --now pacemaker corosync" in inline
    assert "192.168.56.13 node3" in inline


def test_vagrantfile_knobs(tmp_path: Path) -> None:
    calls = _evaluate(tmp_path, {"DTAKE_VAGRANT_NODES": "2", "DTAKE_VAGRANT_SUBNET": "10.9.8"})
    defined = [c["args"][0] for c in calls if c["path"] == "config.vm.define"]
    assert defined == ["node1", "node2"]
    nets = [c["kw"]["ip"] for c in calls if c["path"].endswith(".vm.network")]
    assert nets == ["10.9.8.11", "10.9.8.12"]


def test_run_playbooks_script_calls_the_cli_with_arguments_it_accepts(tmp_path: Path) -> None:
    """run-playbooks.sh with a recording python: every call parses with the real CLI, in the
    order deploy, cluster, resources, verify, and the script stops at the first failure."""
    import sys

    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "from playbooks.cli import _parser\n"
        "args = sys.argv[3:]\n"
        "_parser().parse_args(args)\n"
        f"open({str(log)!r}, 'a').write(json.dumps(args) + '\\n')\n"
        "sys.exit(int(os.environ.get('FAIL_AT') == args[0]) * 2)\n"
    )
    fake.chmod(0o755)
    script = VAGRANT / "run-playbooks.sh"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(VAGRANT.parent)}
    r = subprocess.run(
        [str(script), str(tmp_path / "ssh_config"), "node1,node2", str(fake)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["deploy", "cluster", "resources", "verify"]
    for c in calls:
        assert c[c.index("--ssh-config") + 1] == str(tmp_path / "ssh_config")
        assert c[c.index("--hosts") + 1] == "node1,node2"
    log.unlink()
    r = subprocess.run(
        [str(script), str(tmp_path / "ssh_config"), "node1,node2", str(fake)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "FAIL_AT": "cluster"},
    )
    assert r.returncode == 2
    assert [json.loads(line)[0] for line in log.read_text().splitlines()] == ["deploy", "cluster"]

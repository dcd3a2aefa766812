"""testinfra suites for dtake nodes.

Against your own nodes::

    pytest tests/infra --hosts=ssh://root@node1,ssh://root@node2 \
        [--dtake-config /etc/dtake/dtake.yaml] [--dtake-bin /opt/dtake/venv/bin/dtake] \
        [--dtake-agents] [--dtake-cluster [--dtake-nodes node1,node2]] [--dtake-version 0.1.0]

Against lab nodes (lab/), through the lab's ssh_config::

    pytest tests/infra --hosts=ssh://node1,ssh://node2,ssh://node3 \
        --ssh-config=/run/dtake-lab-dtl/ssh/ssh_config --dtake-bin=/opt/dtake/venv/bin/dtake \
        --dtake-agents --dtake-cluster

(``python -m playbooks verify`` runs this, one pytest per host in parallel over one
multiplexed ssh connection per host, and maps the results to hosts.)

Each module asks a host as few questions as it can: the config, the service status, the
dtsetup record and ``crm_mon`` are read once per module (module-scoped fixtures below),
the attributes of every file the checks look at come from one ``stat`` call.

Without ``--hosts`` (CI, a developer machine) the suite starts a real local service in a
temporary directory and checks it through testinfra's local backend, so the same checks
run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

# pytest puts this directory on sys.path (rootdir-less conftest); mypy, checking the
# packaged copy playbooks/infra, cannot see that
from infra_facts import AGENT_DIR, AGENTS, RECORD, Stat, config_paths  # type: ignore[import-not-found]


def pytest_addoption(parser: Any) -> None:
    g = parser.getgroup("dtake")
    g.addoption(
        "--dtake-config",
        default=None,
        help="service config on the hosts (default /etc/dtake/dtake.yaml)",
    )
    g.addoption(
        "--dtake-bin", default=None, help="dtake command on the hosts (default: dtake on PATH)"
    )
    g.addoption(
        "--dtake-agents", action="store_true", help="also check the OCF agents are installed"
    )
    g.addoption(
        "--dtake-cluster",
        action="store_true",
        help="also check pacemaker: membership, quorum, dtake resource roles (crm_mon XML)",
    )
    g.addoption(
        "--dtake-nodes",
        default=None,
        help="comma-separated node names the cluster must have online (default: the hosts' names)",
    )
    g.addoption(
        "--dtake-version", default=None, help="expected dtake version (default: any, reported)"
    )


class Target:
    def __init__(
        self,
        config: str,
        dtake_bin: str,
        agents: bool,
        *,
        installed: bool = False,
        cluster: bool = False,
        nodes: list[str] | None = None,
        version: str | None = None,
    ) -> None:
        self.config = config
        self.dtake_bin = dtake_bin
        self.agents = agents
        # installed: a host set up by dtsetup (record, service, firewall), not the local
        # throwaway service of the default run
        self.installed = installed
        self.cluster = cluster
        self.nodes = nodes or []
        self.version = version


@pytest.fixture(scope="session")
def dtake_target(request: Any) -> Iterator[Target]:
    hosts = request.config.getoption("hosts", default=None)
    cfg = request.config.getoption("--dtake-config")
    binary = request.config.getoption("--dtake-bin")
    agents = bool(request.config.getoption("--dtake-agents"))
    cluster = bool(request.config.getoption("--dtake-cluster"))
    nodes = [n for n in (request.config.getoption("--dtake-nodes") or "").split(",") if n]
    version = request.config.getoption("--dtake-version")
    if hosts:
        yield Target(
            cfg or "/etc/dtake/dtake.yaml",
            binary or "dtake",
            agents,
            installed=True,
            cluster=cluster,
            nodes=nodes,
            version=version,
        )
        return
    from dtake.protocol.auth import generate_key_file
    from dtake.testing import ServiceProcess

    work = tempfile.mkdtemp(prefix="dtake-infra-")
    key = os.path.join(work, "authkey")
    generate_key_file(key)
    svc = ServiceProcess(os.path.join(work, "node"), "infra-node", key).start()
    try:
        yield Target(
            svc.config_path,
            os.path.join(os.path.dirname(sys.executable), "dtake"),
            agents,
            version=version,
        )
    finally:
        svc.stop()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- facts, once per module
@pytest.fixture(scope="module")
def dtake_config(host: Any, dtake_target: Target) -> dict[str, Any]:
    """The service config on the host (one ``cat``)."""
    out = host.run("cat %s", dtake_target.config)
    assert out.rc == 0, f"{dtake_target.config} is missing: {out.stderr.strip()}"
    data = yaml.safe_load(out.stdout) or {}
    assert isinstance(data, dict), f"{dtake_target.config}: not a mapping"
    return data


@pytest.fixture(scope="module")
def stats(host: Any, dtake_target: Target, dtake_config: dict[str, Any]) -> dict[str, Stat]:
    """mode/owner/type of every path the checks look at, from one ``stat`` (missing paths
    are absent from the result)."""
    paths = [dtake_target.config, RECORD, *config_paths(dtake_config).values()]
    paths += [f"{AGENT_DIR}/{a}" for a in AGENTS]
    out = host.run("stat -c %s -- " + " ".join(["%s"] * len(paths)), "%a|%U|%G|%F|%n", *paths)
    got: dict[str, Stat] = {}
    for line in out.stdout.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5:
            got[parts[4]] = Stat(int(parts[0], 8), parts[1], parts[2], parts[3])
    return got


@pytest.fixture(scope="module")
def dtake_status(host: Any, dtake_target: Target, dtake_config: dict[str, Any]) -> dict[str, Any]:
    """``dtake --json status`` through the control socket (one call)."""
    sock = config_paths(dtake_config)["control_socket"]
    out = host.run(f"{dtake_target.dtake_bin} --socket %s --json status", sock)
    assert out.rc == 0, f"dtake status: {out.stderr.strip()}"
    data = json.loads(out.stdout)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def dtsetup_record(host: Any, dtake_target: Target) -> dict[str, Any]:
    """/etc/dtake/dtsetup.json (skips on the local throwaway service: not installed)."""
    if not dtake_target.installed:
        pytest.skip("local service: not installed by dtsetup (run with --hosts)")
    out = host.run("cat %s", RECORD)
    assert out.rc == 0, f"{RECORD} missing: not installed by dtsetup"
    data = json.loads(out.stdout)
    assert isinstance(data, dict)
    return data

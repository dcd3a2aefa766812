"""verify: run the testinfra suites of tests/infra against the hosts; one result per host.

pytest runs here (the controller), **one pytest per host, in parallel** (a bounded pool of
``forks``), each with ``--hosts=ssh://HOST``. Every ssh command of a host goes through one
multiplexed connection: a generated ssh_config sets ``ControlMaster auto`` /
``ControlPath`` / ``ControlPersist`` and includes the user's ssh_config; the masters are
closed (``ssh -O exit``) when the run ends. Each test case's result is mapped back to its
host from the JUnit XML, so the recap says which checks failed where.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from playbooks.recap import FAILED, OK, SKIPPED, HostResult, PlaybookResult
from playbooks.reports import Finding

__all__ = ["INFRA_DIR", "VerifyOptions", "mux_ssh_config", "pytest_argv", "verify"]

# tests/infra of the checkout, else the copy shipped in the wheel (playbooks/infra is a
# symlink to it in the checkout, packaged as data)
_CHECKOUT_INFRA = Path(__file__).resolve().parents[1] / "tests" / "infra"
INFRA_DIR = _CHECKOUT_INFRA if _CHECKOUT_INFRA.is_dir() else Path(__file__).parent / "infra"


@dataclass
class VerifyOptions:
    ssh_config: str | None = None
    identity: str | None = None
    dtake_bin: str = "/opt/dtake/venv/bin/dtake"
    agents: bool = True
    cluster: bool = True
    expect_nodes: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    timeout: float = 600.0
    forks: int = 5
    multiplex: bool = True  # one ssh connection per host (ControlMaster)


def mux_ssh_config(tmp: str, ssh_config: str | None) -> str:
    """An ssh_config that multiplexes every ssh to a host over one connection, then
    includes ``ssh_config`` (else the user's and the system's, as plain ssh reads them)."""
    lines = [
        "# dtake verify: one multiplexed ssh connection per host",
        "Host *",
        f"    ControlPath {tmp}/cm-%C",
        "    ControlMaster auto",
        "    ControlPersist 120",
    ]
    if ssh_config:
        lines.append(f"Include {os.path.abspath(ssh_config)}")
    else:
        lines += [
            f"Include {p}"
            for p in (os.path.expanduser("~/.ssh/config"), "/etc/ssh/ssh_config")
            if os.path.exists(p)
        ]
    path = os.path.join(tmp, "ssh_config")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def _spec(host: str) -> str:
    return host if "://" in host else f"ssh://{host}"


def pytest_argv(
    hosts: list[str], o: VerifyOptions, junit: str, *, ssh_config: str | None = None
) -> list[str]:
    ssh_config = ssh_config or o.ssh_config
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(INFRA_DIR),
        "-p",
        "no:cacheprovider",
        "-q",
        f"--junitxml={junit}",
        "--hosts=" + ",".join(_spec(h) for h in hosts),
        f"--dtake-bin={o.dtake_bin}",
    ]
    if ssh_config:
        argv.append(f"--ssh-config={ssh_config}")
    if o.identity:
        argv.append(f"--ssh-identity-file={o.identity}")
    if o.agents:
        argv.append("--dtake-agents")
    if o.cluster:
        argv.append("--dtake-cluster")
    if o.expect_nodes:
        argv.append("--dtake-nodes=" + ",".join(o.expect_nodes))
    return argv + o.extra


def _collect(junit: str, res: HostResult) -> None:
    """The test cases of one host's pytest run, as that host's tasks."""
    for case in ET.parse(junit).getroot().iter("testcase"):
        test = case.get("name", "").split("[")[0]
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            msg = (bad.get("message") or "").splitlines()
            res.add(test, FAILED, msg[0][:300] if msg else "")
        elif skipped is not None:
            res.add(test, SKIPPED, (skipped.get("message") or "")[:200])
        else:
            res.add(test, OK)


def _close_masters(ssh_config: str, hosts: list[str]) -> None:
    """End the ControlPersist masters this run started (each exits on ``-O exit``)."""
    for h in hosts:
        name = h.split("://", 1)[-1].split("?", 1)[0].rsplit("@", 1)[-1]
        try:
            subprocess.run(
                ["ssh", "-F", ssh_config, "-O", "exit", name],
                capture_output=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            pass


def verify(hosts: list[str], o: VerifyOptions) -> PlaybookResult:
    t0 = time.monotonic()
    result = PlaybookResult("verify")
    by_host = {h: HostResult(h) for h in hosts}
    result.hosts = list(by_host.values())
    with tempfile.TemporaryDirectory(prefix="dtake-verify-") as tmp:
        ssh_config = mux_ssh_config(tmp, o.ssh_config) if o.multiplex else o.ssh_config

        def one(h: str) -> Finding | None:
            junit = os.path.join(tmp, f"junit-{hosts.index(h)}.xml")
            t = time.monotonic()
            try:
                r = subprocess.run(
                    pytest_argv([h], o, junit, ssh_config=ssh_config),
                    capture_output=True,
                    text=True,
                    timeout=o.timeout,
                    cwd=str(INFRA_DIR),
                )
            except subprocess.TimeoutExpired:
                by_host[h].add("verify", FAILED, f"pytest ran over {o.timeout:.0f}s")
                return Finding("VERIFY_TIMEOUT", f"pytest ran over {o.timeout:.0f}s", host=h)
            finally:
                by_host[h].seconds = time.monotonic() - t
            if not os.path.exists(junit):
                msg = f"pytest exited {r.returncode}: {(r.stdout + r.stderr)[-1500:]}"
                by_host[h].add("verify", FAILED, msg[:300])
                return Finding("VERIFY_ERROR", msg, host=h)
            _collect(junit, by_host[h])
            return None

        try:
            with cf.ThreadPoolExecutor(max_workers=max(1, min(o.forks, len(hosts)))) as pool:
                for finding in pool.map(one, hosts):
                    if finding is not None:
                        result.findings.append(finding)
        finally:
            if o.multiplex and ssh_config:
                _close_masters(ssh_config, hosts)
    result.seconds = time.monotonic() - t0
    return result

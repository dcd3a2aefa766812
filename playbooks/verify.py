"""verify: run the testinfra suites of tests/infra against the hosts; one result per host.

pytest runs here (the controller) with ``--hosts=ssh://...``; each test case's result is
mapped back to its host from the JUnit XML, so the recap says which checks failed where.
"""

from __future__ import annotations

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

__all__ = ["INFRA_DIR", "VerifyOptions", "verify"]

INFRA_DIR = Path(__file__).resolve().parents[1] / "tests" / "infra"


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


def pytest_argv(hosts: list[str], o: VerifyOptions, junit: str) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(INFRA_DIR),
        "-p",
        "no:cacheprovider",
        "-q",
        f"--junitxml={junit}",
        "--hosts=" + ",".join(h if "://" in h else f"ssh://{h}" for h in hosts),
        f"--dtake-bin={o.dtake_bin}",
    ]
    if o.ssh_config:
        argv.append(f"--ssh-config={o.ssh_config}")
    if o.identity:
        argv.append(f"--ssh-identity-file={o.identity}")
    if o.agents:
        argv.append("--dtake-agents")
    if o.cluster:
        argv.append("--dtake-cluster")
    if o.expect_nodes:
        argv.append("--dtake-nodes=" + ",".join(o.expect_nodes))
    return argv + o.extra


def _host_of(name: str, hosts: list[str]) -> str:
    # testinfra parametrises the `host` fixture: test_x[ssh://node1]
    if "[" in name:
        param = name[name.index("[") + 1 : name.rindex("]")]
        for h in hosts:
            if param.endswith(h) or param.endswith(h.split("://")[-1]):
                return h
    return ""


def verify(hosts: list[str], o: VerifyOptions) -> PlaybookResult:
    t0 = time.monotonic()
    result = PlaybookResult("verify")
    by_host = {h: HostResult(h) for h in hosts}
    with tempfile.TemporaryDirectory(prefix="dtake-verify-") as tmp:
        junit = os.path.join(tmp, "junit.xml")
        try:
            r = subprocess.run(
                pytest_argv(hosts, o, junit),
                capture_output=True,
                text=True,
                timeout=o.timeout,
                cwd=str(INFRA_DIR.parents[1]),
            )
        except subprocess.TimeoutExpired:
            result.findings.append(Finding("VERIFY_TIMEOUT", f"pytest ran over {o.timeout:.0f}s"))
            result.hosts = list(by_host.values())
            return result
        if not os.path.exists(junit):
            result.findings.append(
                Finding("VERIFY_ERROR", f"pytest exited {r.returncode}: {r.stdout[-1500:]}")
            )
            result.hosts = list(by_host.values())
            return result
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name", "")
            host = _host_of(name, hosts)
            res = by_host.get(host)
            if res is None:
                continue
            test = name.split("[")[0]
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
    result.hosts = list(by_host.values())
    result.seconds = time.monotonic() - t0
    return result

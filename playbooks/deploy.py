"""deploy: install and configure dtake on many hosts with dtsetup (DESIGN §4, §5).

Per host, serially (the pool runs hosts in parallel):

1. facts      ``uname -n``: the machine name picks the DTSetup.ini section [seed L590]
2. workdir    ``/var/lib/dtake-deploy`` (0700): wheelhouse, DTSetup.ini, cluster key
3. wheelhouse upload only the wheels whose sha256 differs; remove stale ones
4. ini, key   uploaded 0600 (the ini holds the activation code), only when different
5. bootstrap  a small venv with dtsetup from the wheelhouse (once per wheelhouse)
6. dtsetup    ``dtsetup apply INI --host NAME --json``: each dtsetup step becomes a task

Check mode (``check=True``) writes nothing: uploads report what they would do and
dtsetup runs with ``--check`` when it is bootstrapped already.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from playbooks.recap import CHANGED, FAILED, OK, SKIPPED, HostResult, PlaybookResult
from playbooks.remote import Connector, Remote, run_hosts
from playbooks.wheelhouse import manifest

__all__ = ["DEFAULT_WORKDIR", "DeployOptions", "deploy"]

DEFAULT_WORKDIR = "/var/lib/dtake-deploy"


@dataclass
class DeployOptions:
    ini: Path
    wheelhouse: Path
    auth_key: Path
    workdir: str = DEFAULT_WORKDIR
    python: str = "/usr/bin/python3"
    check: bool = False
    diff: bool = False
    forks: int = 5
    host_timeout: float = 600.0
    retry_file: Path | None = None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _remote_sums(remote: Remote, paths: list[str]) -> dict[str, str]:
    q = " ".join(shlex.quote(p) for p in paths)
    r = remote.run(f"sha256sum {q} 2>/dev/null; true")
    out: dict[str, str] = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[parts[1].lstrip("*").strip()] = parts[0]
    return out


def _host(remote: Remote, res: HostResult, o: DeployOptions, wheels: dict[str, str]) -> None:
    w = o.workdir
    q = shlex.quote
    # 1. facts
    name = remote.run("uname -n", check=True).stdout.strip()
    res.add("facts", OK, f"machine name {name}")
    # 2. workdir
    if remote.run(f"test -d {q(w)}/wheelhouse").ok:
        res.add("workdir", OK)
    elif o.check:
        res.add("workdir", CHANGED, f"would create {w}")
    else:
        remote.run(f"umask 077 && mkdir -p {q(w)}/wheelhouse && chmod 0700 {q(w)}", check=True)
        res.add("workdir", CHANGED, f"created {w}")
    # 3. wheelhouse
    have = _remote_sums(remote, [f"{w}/wheelhouse/{n}" for n in wheels])
    missing = [n for n, s in wheels.items() if have.get(f"{w}/wheelhouse/{n}") != s]
    listed = remote.run(f"ls {q(w)}/wheelhouse 2>/dev/null; true").stdout.split()
    stale = [f for f in listed if f.endswith(".whl") and f not in wheels]
    if not missing and not stale:
        res.add("wheelhouse", OK, f"{len(wheels)} wheels")
    elif o.check:
        res.add("wheelhouse", CHANGED, f"would upload {len(missing)}, remove {len(stale)}")
    else:
        for n in missing:
            remote.put(str(o.wheelhouse / n), f"{w}/wheelhouse/{n}")
        if stale:
            remote.run("rm -f " + " ".join(q(f"{w}/wheelhouse/{f}") for f in stale), check=True)
        res.add("wheelhouse", CHANGED, f"uploaded {len(missing)}, removed {len(stale)}")
    # 4. ini and cluster key (both secret: 0600, never printed)
    # The key goes without its newline: dtsetup 0.1's --auth-key-file appends one to a key
    # that already ends in one (its regex uses `$`), and the service then rejects the key.
    key = o.auth_key.read_bytes().strip()
    files = {f"{w}/DTSetup.ini": o.ini.read_bytes(), f"{w}/authkey": key}
    sums = _remote_sums(remote, list(files))
    for path, data in files.items():
        label = Path(path).name
        if sums.get(path) == _sha(data):
            res.add(f"upload {label}", OK)
        elif o.check:
            res.add(f"upload {label}", CHANGED, "would upload (0600)")
        else:
            remote.put_bytes(data, path, mode=0o600)
            res.add(f"upload {label}", CHANGED, "uploaded (0600)")
    # 5. bootstrap venv with dtsetup
    digest = _sha("".join(f"{n}={s}\n" for n, s in sorted(wheels.items())).encode())[:16]
    boot = f"{w}/bootstrap"
    marker = remote.run(f"cat {q(boot)}/.wheelhouse 2>/dev/null; true").stdout.strip()
    if marker == digest:
        res.add("bootstrap", OK)
    elif o.check:
        res.add("bootstrap", CHANGED, "would install dtsetup into a bootstrap venv")
    else:
        remote.run(
            f"rm -rf {q(boot)} && {q(o.python)} -m venv {q(boot)} && "
            f"{q(boot)}/bin/pip install --quiet --disable-pip-version-check --no-index "
            f"--find-links {q(w)}/wheelhouse dtake && echo {digest} > {q(boot)}/.wheelhouse",
            timeout=300,
            check=True,
        )
        res.add("bootstrap", CHANGED, "dtsetup installed in the bootstrap venv")
    # 6. dtsetup apply with the host's own section
    if o.check and marker != digest:
        res.add("dtsetup", SKIPPED, "not bootstrapped yet: nothing to plan with")
        return
    argv = [
        f"{boot}/bin/dtsetup",
        "apply",
        f"{w}/DTSetup.ini",
        "--host",
        name,
        "--wheelhouse",
        f"{w}/wheelhouse",
        "--auth-key-file",
        f"{w}/authkey",
        "--json",
    ]
    if o.check:
        argv.append("--check")
    if o.diff:
        argv.append("--diff")
    r = remote.run(" ".join(q(a) for a in argv), timeout=400)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        res.add("dtsetup", FAILED, f"exit {r.rc}: {r.tail()}")
        return
    for step in report.get("steps", []):
        status = step.get("status", FAILED)
        summary = step.get("summary", "")
        if status not in (OK, CHANGED, FAILED, SKIPPED):  # rolled_back
            status, summary = FAILED, f"{status}: {summary}"
        res.add(f"dtsetup {step.get('name')}", status, summary, step.get("diff", ""))
    errors = [x for x in report.get("reports", []) if x.get("severity") == "error"]
    if r.rc == 1 or errors:
        msg = "; ".join(f"{x.get('code')}: {x.get('message')}" for x in errors) or r.tail()
        res.add("dtsetup", FAILED, msg)


def deploy(hosts: list[str], connect: Connector, o: DeployOptions) -> PlaybookResult:
    t0 = time.monotonic()
    wheels = manifest(o.wheelhouse)
    result = PlaybookResult("deploy")
    if not wheels:
        from playbooks.reports import Finding

        result.findings.append(Finding("NO_WHEELS", f"no wheels in {o.wheelhouse}"))
        return result
    result.hosts = run_hosts(
        hosts,
        connect,
        lambda remote, res: _host(remote, res, o, wheels),
        forks=o.forks,
        host_timeout=o.host_timeout,
    )
    if o.retry_file is not None:
        from playbooks.recap import write_retry_file

        result.retry_file = write_retry_file(o.retry_file, result.failed_hosts)
    result.seconds = time.monotonic() - t0
    return result

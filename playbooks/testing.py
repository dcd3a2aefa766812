"""Test doubles for the playbooks (as fabric.testing is for Fabric): a scripted Remote.

    remote = ScriptedRemote("node1", {"uname -n": "node1\\n", "cibadmin --query": CIB})
    remote.script(r"crm_diff .*", rc=1, stdout=PATCH)

A command is answered by the first rule whose regex matches it (``re.search``); every
command and upload is recorded in ``remote.calls`` / ``remote.files``. An unscripted
command fails the test loudly (rc 127 plus an entry in ``remote.unexpected``).

``fresh_host`` / ``converged_host`` are scripted deploy targets (never deployed /
already deployed with given options), ``running_host`` one that runs an older build
(its ``dtake --json status``); ``bumped_wheelhouse`` builds the "newer version" an
upgrade test installs, ``fake_dtake_wheel`` a stand-in wheel with a given protocol range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from playbooks.deploy import DeployOptions
from playbooks.remote import CmdResult, Connector, Remote, Unreachable

__all__ = [
    "Rule",
    "ScriptedRemote",
    "bumped_wheelhouse",
    "converged_host",
    "dtsetup_json",
    "fake_dtake_wheel",
    "fresh_host",
    "running_host",
    "scripted_connector",
]


@dataclass
class Rule:
    pattern: str
    rc: int = 0
    stdout: str = ""
    stderr: str = ""
    times: int | None = None  # None: forever


@dataclass
class ScriptedRemote:
    host: str
    rules: list[Rule] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    closed: bool = False

    def script(
        self,
        pattern: str,
        *,
        rc: int = 0,
        stdout: str = "",
        stderr: str = "",
        times: int | None = None,
        first: bool = False,
    ) -> ScriptedRemote:
        """Add a rule (last; ``first``: before the others, to override one)."""
        rule = Rule(pattern, rc, stdout, stderr, times)
        if first:
            self.rules.insert(0, rule)
        else:
            self.rules.append(rule)
        return self

    def run(self, command: str, *, timeout: float | None = None, check: bool = False) -> CmdResult:
        from playbooks.remote import RemoteCommandError

        self.calls.append(command)
        for rule in self.rules:
            if rule.times == 0:
                continue
            if re.search(rule.pattern, command):
                if rule.times is not None:
                    rule.times -= 1
                res = CmdResult(command, rule.rc, rule.stdout, rule.stderr)
                break
        else:
            self.unexpected.append(command)
            res = CmdResult(command, 127, "", f"unscripted command: {command}")
        if check and not res.ok:
            raise RemoteCommandError(self.host, res)
        return res

    def put(self, local: str, remote: str) -> None:
        self.calls.append(f"put {local} {remote}")
        self.files[remote] = Path(local).read_bytes()

    def put_bytes(self, data: bytes, remote: str, *, mode: int = 0o600) -> None:
        self.calls.append(f"put_bytes {remote} {mode:o}")
        self.files[remote] = data

    def close(self) -> None:
        self.closed = True

    def ran(self, pattern: str) -> list[str]:
        return [c for c in self.calls if re.search(pattern, c)]


def scripted_connector(
    remotes: dict[str, ScriptedRemote], *, unreachable: tuple[str, ...] = ()
) -> Connector:
    def connect(host: str) -> Remote:
        if host in unreachable or host not in remotes:
            raise Unreachable(f"{host}: connection refused")
        return remotes[host]

    return connect


def bumped_wheelhouse(house: Path, dest: Path, local: str, *, repo: Path | None = None) -> str:
    """A copy of wheelhouse ``house`` in ``dest`` whose dtake wheel is rebuilt from a copy of
    the tree with the version ``<version>+<local>`` (PEP 440 local version): what an
    upgrade installs. The dependency wheels are the same files. Returns the new version."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import tomllib

    from playbooks.wheelhouse import REPO, SOURCES

    repo = repo or REPO
    old = str(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"])
    new = f"{old}+{local}"
    dest.mkdir(parents=True, exist_ok=True)
    for whl in house.glob("*.whl"):
        if not whl.name.startswith("dtake-"):
            shutil.copy2(whl, dest / whl.name)
    with tempfile.TemporaryDirectory(prefix="dtake-bump-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for top in SOURCES:  # what goes into the wheel
            p = repo / top
            if p.is_dir():
                shutil.copytree(p, src / top, ignore=shutil.ignore_patterns("__pycache__"))
            elif p.is_file():
                shutil.copy2(p, src / top)
        for rel, pattern in (
            ("pyproject.toml", 'version = "{}"'),
            ("dtake/__init__.py", '__version__ = "{}"'),
        ):
            f = src / rel
            text = f.read_text()
            if pattern.format(old) not in text:
                raise RuntimeError(f"{rel}: no {pattern.format(old)!r} to bump")
            f.write_text(text.replace(pattern.format(old), pattern.format(new), 1))
        env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", PIP_DISABLE_PIP_VERSION_CHECK="1")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--wheel-dir",
                str(dest),
                str(src),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if r.returncode != 0:
            raise RuntimeError(f"pip wheel failed: {r.stderr.strip()[-2000:]}")
    return new


# ---------------------------------------------------------------- scripted deploy targets
def dtsetup_json(host: str, changed: bool) -> str:
    """What ``dtsetup apply --json`` prints (software + service steps)."""
    import json

    steps = [
        {"name": n, "status": "changed" if changed else "ok", "summary": ""}
        for n in ("software", "service")
    ]
    return json.dumps(
        {"host": host, "exit_code": 2 if changed else 0, "steps": steps, "reports": []}
    )


STATUS = r"dtake --json status$"


def fake_dtake_wheel(
    dest: Path, *, version: str = "0.2.0", protocol: tuple[int, int] | None = (2, 2)
) -> Path:
    """A stand-in dtake wheel in DEST (a zip with the two protocol constants the upgrade
    playbook reads: ``MIN_PROTOCOL_VERSION`` in auth.py, ``PROTOCOL_VERSION`` in
    framing.py); ``protocol=None``: without them."""
    import zipfile

    dest.mkdir(parents=True, exist_ok=True)
    whl = dest / f"dtake-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("dtake/__init__.py", f'__version__ = "{version}"\n')
        if protocol is not None:
            z.writestr("dtake/protocol/auth.py", f"MIN_PROTOCOL_VERSION = {protocol[0]}\n")
            z.writestr("dtake/protocol/framing.py", f"PROTOCOL_VERSION = {protocol[1]}\n")
    return whl


def fresh_host(name: str) -> ScriptedRemote:
    """A host the deploy playbook never touched: everything it does is a change (and it
    has no dtake: its ``dtake --json status`` is "command not found")."""
    r = _deploy_target(name)
    r.script(STATUS, rc=127, stderr="/opt/dtake/venv/bin/dtake: No such file or directory")
    return r


def running_host(
    name: str, protocol: tuple[int, int] | None, *, version: str = "0.1.0"
) -> ScriptedRemote:
    """A host to upgrade that runs dtake VERSION now: its ``dtake --json status`` reports
    PROTOCOL (None: no ``protocol`` key, as builds before it)."""
    import json

    st: dict[str, object] = {"node": name, "version": version, "connections": []}
    if protocol is not None:
        st["protocol"] = list(protocol)
    r = _deploy_target(name)
    r.script(STATUS, stdout=json.dumps(st))
    return r


def _deploy_target(name: str) -> ScriptedRemote:
    r = ScriptedRemote(name)
    r.script(r"^uname -n$", stdout=f"{name}\n")
    r.script(r"^test -d ", rc=1)
    r.script(r"^umask 077 && mkdir")
    r.script(r"^sha256sum ")
    r.script(r"^ls ")
    r.script(r"^cat .*/\.wheelhouse")
    r.script(r"-m venv .*pip install")
    r.script(r"bin/dtsetup apply", rc=2, stdout=dtsetup_json(name, True))
    return r


def converged_host(name: str, o: DeployOptions) -> ScriptedRemote:
    """A host already deployed with ``o`` (its wheelhouse, ini and key): nothing to do."""
    import hashlib

    from playbooks.wheelhouse import manifest

    w = o.workdir
    wheels = manifest(o.wheelhouse)
    sums = {f"{w}/wheelhouse/{n}": s for n, s in wheels.items()}
    sums[f"{w}/DTSetup.ini"] = hashlib.sha256(o.ini.read_bytes()).hexdigest()
    sums[f"{w}/authkey"] = hashlib.sha256(o.auth_key.read_bytes().strip()).hexdigest()
    listing = "".join(f"{n}={s}\n" for n, s in sorted(wheels.items()))
    digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
    r = ScriptedRemote(name)
    r.script(r"^uname -n$", stdout=f"{name}\n")
    r.script(r"^test -d ")
    r.script(r"^sha256sum ", stdout="".join(f"{s}  {p}\n" for p, s in sums.items()))
    r.script(r"^ls ", stdout="".join(n + "\n" for n in wheels))
    r.script(r"^cat .*/\.wheelhouse", stdout=digest + "\n")
    r.script(r"bin/dtsetup apply", stdout=dtsetup_json(name, False))
    return r

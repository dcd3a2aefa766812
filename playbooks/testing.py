"""Test doubles for the playbooks (as fabric.testing is for Fabric): a scripted Remote.

    remote = ScriptedRemote("node1", {"uname -n": "node1\\n", "cibadmin --query": CIB})
    remote.script(r"crm_diff .*", rc=1, stdout=PATCH)

A command is answered by the first rule whose regex matches it (``re.search``); every
command and upload is recorded in ``remote.calls`` / ``remote.files``. An unscripted
command fails the test loudly (rc 127 plus an entry in ``remote.unexpected``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from playbooks.remote import CmdResult, Connector, Remote, Unreachable

__all__ = ["Rule", "ScriptedRemote", "scripted_connector"]


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
    ) -> ScriptedRemote:
        self.rules.append(Rule(pattern, rc, stdout, stderr, times))
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

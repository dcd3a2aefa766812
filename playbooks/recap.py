"""Per-host results and the recap (Ansible's PLAY RECAP, anchors-iac-style §1.1).

Every task reports ``ok`` (already in state), ``changed``, ``failed`` or ``skipped``; a host
that could not be reached is ``unreachable``. A run never raises halfway: each host gets a
:class:`HostResult`, the recap names the failed hosts, and they are written to a retry
file for ``--limit @FILE``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from playbooks.reports import Finding

__all__ = [
    "CHANGED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_SPEC",
    "EXIT_UNREACHABLE",
    "FAILED",
    "OK",
    "SKIPPED",
    "HostResult",
    "PlaybookResult",
    "TaskResult",
    "read_retry_file",
    "write_retry_file",
]

OK, CHANGED, FAILED, SKIPPED = "ok", "changed", "failed", "skipped"

# Exit codes, as Ansible's: 0 every host ok (changed or not), 1 the input is invalid and
# nothing ran, 2 a host failed, 4 a host was unreachable (and none failed).
EXIT_OK, EXIT_SPEC, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2, 4


@dataclass
class TaskResult:
    name: str
    status: str  # ok | changed | failed | skipped
    msg: str = ""
    diff: str = ""

    @property
    def changed(self) -> bool:
        return self.status == CHANGED


@dataclass
class HostResult:
    host: str
    tasks: list[TaskResult] = field(default_factory=list)
    unreachable: str = ""  # why, when the host could not be reached
    seconds: float = 0.0

    def add(self, name: str, status: str, msg: str = "", diff: str = "") -> TaskResult:
        t = TaskResult(name, status, msg, diff)
        self.tasks.append(t)
        return t

    def count(self, status: str) -> int:
        return sum(1 for t in self.tasks if t.status == status)

    @property
    def failed(self) -> bool:
        return bool(self.unreachable) or self.count(FAILED) > 0

    @property
    def changed(self) -> bool:
        return self.count(CHANGED) > 0

    def recap(self) -> str:
        return (
            f"{self.host:<12} : ok={self.count(OK)} changed={self.count(CHANGED)} "
            f"unreachable={1 if self.unreachable else 0} failed={self.count(FAILED)} "
            f"skipped={self.count(SKIPPED)}"
        )


@dataclass
class PlaybookResult:
    playbook: str
    hosts: list[HostResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    retry_file: str = ""

    @property
    def changed(self) -> bool:
        return any(h.changed for h in self.hosts)

    @property
    def failed_hosts(self) -> list[str]:
        return [h.host for h in self.hosts if h.failed]

    @property
    def exit_code(self) -> int:
        if any(f.severity == "error" for f in self.findings) and not self.hosts:
            return EXIT_SPEC
        if any(h.count(FAILED) for h in self.hosts) or any(
            f.severity == "error" for f in self.findings
        ):
            return EXIT_FAILED
        if any(h.unreachable for h in self.hosts):
            return EXIT_UNREACHABLE
        return EXIT_OK

    def render(self, *, verbose: bool = False) -> str:
        out: list[str] = []
        for f in self.findings:
            out.append(f.render())
        for h in self.hosts:
            if h.unreachable:
                out.append(f"unreachable: [{h.host}] {h.unreachable}")
            for t in h.tasks:
                if t.status == OK and not verbose:
                    continue
                line = f"{t.status}: [{h.host}] {t.name}"
                if t.msg:
                    line += f" - {t.msg}"
                out.append(line)
                if t.diff:
                    out.extend("    " + d for d in t.diff.splitlines())
        out.append(f"RECAP {self.playbook} ({self.seconds:.1f}s)")
        out.extend("  " + h.recap() for h in self.hosts)
        failed = self.failed_hosts
        if failed:
            out.append(f"failed hosts: {', '.join(failed)}")
            if self.retry_file:
                out.append(f"retry with: --limit @{self.retry_file}")
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "exit_code": self.exit_code,
            "changed": self.changed,
            "failed_hosts": self.failed_hosts,
            "retry_file": self.retry_file,
            "seconds": round(self.seconds, 3),
            "findings": [f.as_dict() for f in self.findings],
            "hosts": [
                {
                    "host": h.host,
                    "unreachable": h.unreachable,
                    "seconds": round(h.seconds, 3),
                    "recap": {s: h.count(s) for s in (OK, CHANGED, FAILED, SKIPPED)},
                    "tasks": [asdict(t) for t in h.tasks],
                }
                for h in self.hosts
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def write_retry_file(path: str | Path, hosts: list[str]) -> str:
    """One failed host per line; removed when nothing failed (a stale file misleads)."""
    p = Path(path)
    if not hosts:
        if p.exists():
            p.unlink()
        return ""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(h + "\n" for h in hosts), encoding="utf-8")
    os.replace(tmp, p)
    return str(p)


def read_retry_file(path: str | Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]

"""The lab's exceptions: one base class, the failed command attached where there is one."""

from __future__ import annotations

import subprocess

__all__ = ["LabError", "LabTimeout", "NodeCommandError", "NodeDown", "PreflightError"]


class LabError(Exception):
    """Anything the lab could not do."""


class PreflightError(LabError):
    """The machine lacks what the lab needs; the message names the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "the lab cannot run on this machine:\n" + "\n".join(f"  - {p}" for p in problems)
        )


class NodeDown(LabError):
    """The node's namespaces are not running (killed, or never started)."""


class LabTimeout(LabError):
    """A bounded wait ran out."""


class NodeCommandError(LabError):
    """A command inside a node failed (non-zero exit or timeout); ``result`` holds its output."""

    def __init__(
        self,
        node: str,
        result: subprocess.CompletedProcess[str],
        *,
        timed_out: bool = False,
    ) -> None:
        self.node = node
        self.result = result
        self.timed_out = timed_out
        cmd = result.args if isinstance(result.args, str) else " ".join(map(str, result.args))
        what = "timed out" if timed_out else f"exited {result.returncode}"
        tail = (result.stderr or result.stdout or "").strip()[-2000:]
        super().__init__(f"{node}: `{cmd}` {what}" + (f":\n{tail}" if tail else ""))

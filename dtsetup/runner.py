"""The seam to every external program (systemctl, nft, groupadd, pip, ...).

Domain code calls :class:`Runner`; production uses :class:`SubprocessRunner`; unit tests
script the calls with :class:`ScriptedRunner` (the project's own test double, as
``fabric.testing.MockRemote`` is fabric's).
"""

from __future__ import annotations

import abc
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["CommandFailed", "Completed", "Runner", "ScriptedRunner", "SubprocessRunner"]

Env = Mapping[str, str] | None  # extra environment variables for one command


@dataclass(frozen=True, slots=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandFailed(Exception):
    """A command that had to succeed did not; the result is attached (as invoke's UnexpectedExit)."""

    def __init__(self, result: Completed) -> None:
        self.result = result
        detail = (result.stderr or result.stdout).strip().splitlines()
        tail = detail[-1] if detail else ""
        super().__init__(f"{' '.join(result.argv)} exited {result.returncode}: {tail}")


class Runner(abc.ABC):
    """Runs one program (argv, never a shell); ``check=True`` raises :class:`CommandFailed`
    if it does not succeed. Implementations say how a command completes (:meth:`_run`)."""

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = False,
        env: Env = None,
    ) -> Completed:
        result = self._run(argv, input, env)
        if check and not result.ok:
            raise CommandFailed(result)
        return result

    @abc.abstractmethod
    def _run(self, argv: Sequence[str], input: str | None, env: Env) -> Completed: ...

    @abc.abstractmethod
    def which(self, name: str) -> str | None: ...


class SubprocessRunner(Runner):
    """Runs programs for real, never through a shell, with a C locale for parseable output."""

    def __init__(self, *, timeout: float = 600.0) -> None:
        self.timeout = timeout

    def _run(self, argv: Sequence[str], input: str | None, env: Env) -> Completed:
        full_env = dict(os.environ) | {"LC_ALL": "C"} | dict(env or {})
        try:
            proc = subprocess.run(
                list(argv),
                input=input,
                capture_output=True,
                text=True,
                env=full_env,
                timeout=self.timeout,
                check=False,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
            result = Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
        except FileNotFoundError as exc:
            result = Completed(tuple(argv), 127, "", str(exc))
        except subprocess.TimeoutExpired:
            result = Completed(tuple(argv), 124, "", f"timed out after {self.timeout}s")
        return result

    def which(self, name: str) -> str | None:
        return shutil.which(name)


Handler = Callable[[tuple[str, ...], str | None], Completed | tuple[int, str] | int]


@dataclass
class ScriptedRunner(Runner):
    """Test double: answers commands from a script and records every call.

    ``script`` maps an argv prefix (a tuple) to a handler or a canned answer ``(rc,
    stdout)``; the longest matching prefix wins. Unscripted commands fail the test loudly
    (rc 127 and an entry in ``unexpected``) instead of touching the machine.
    """

    script: dict[tuple[str, ...], Handler | tuple[int, str] | int] = field(default_factory=dict)
    programs: set[str] = field(default_factory=set)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    inputs: list[str | None] = field(default_factory=list)
    unexpected: list[tuple[str, ...]] = field(default_factory=list)

    def on(self, *prefix: str, answer: Handler | tuple[int, str] | int = 0) -> ScriptedRunner:
        self.script[tuple(prefix)] = answer
        return self

    def _run(self, argv: Sequence[str], input: str | None, env: Env) -> Completed:
        key = tuple(str(a) for a in argv)
        self.calls.append(key)
        self.inputs.append(input)
        best: tuple[str, ...] | None = None
        for prefix in self.script:
            if key[: len(prefix)] == prefix and (best is None or len(prefix) > len(best)):
                best = prefix
        if best is None:
            self.unexpected.append(key)
            result = Completed(key, 127, "", "unscripted command")
        else:
            scripted = self.script[best]
            answer = scripted(key, input) if callable(scripted) else scripted
            if isinstance(answer, Completed):
                result = answer
            elif isinstance(answer, int):
                result = Completed(key, answer)
            else:
                result = Completed(key, answer[0], answer[1])
        return result

    def which(self, name: str) -> str | None:
        return f"/usr/sbin/{name}" if name in self.programs else None

    def ran(self, *prefix: str) -> bool:
        return any(call[: len(prefix)] == prefix for call in self.calls)

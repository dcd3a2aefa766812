"""The software: a virtualenv in <DOUBLETAKEFOLDER>/venv, installed offline from a wheel
or a wheelhouse (``pip --no-index``), so nodes need no registry access.

The venv is built in place (venvs are not relocatable); the previous one is moved aside
first and put back if anything later fails. A marker file holds the digest of the
installed wheels and their stat signature (name, size, mtime): the same signature, or
else the same digest, means nothing to do. A no-op apply then only stat()s the wheels.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtsetup.reports import Code
from dtsetup.steps.base import Change, Context, StepError
from dtsetup.txn import Transaction, atomic_write, read_bytes

__all__ = ["SoftwareSource", "SoftwareStep"]

MARKER = ".dtsetup-software"


@dataclass(frozen=True, slots=True)
class SoftwareSource:
    """Either one wheel (its directory also serves as the wheelhouse for dependencies)
    or a wheelhouse directory holding ``dtake`` and its dependencies."""

    wheel: Path | None = None
    wheelhouse: Path | None = None

    def find_links(self) -> Path:
        if self.wheelhouse is not None:
            return self.wheelhouse
        assert self.wheel is not None
        return self.wheel.parent

    def requirement(self) -> str:
        return str(self.wheel) if self.wheel is not None else "dtake"

    def files(self) -> list[Path]:
        if self.wheel is not None:
            return [self.wheel]
        return sorted(self.find_links().glob("*.whl"))

    def stat_signature(self) -> str:
        """Name, size and mtime (ns) of every wheel: a stat() each, no reading. Equal to
        the one recorded at install time means the same wheels without hashing 8 MB."""
        h = hashlib.sha256()
        for path in self.files():
            st = path.stat()
            h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return "stat:" + h.hexdigest()

    def digest(self) -> str:
        h = hashlib.sha256()
        for path in self.files():
            h.update(path.name.encode() + b"\0")
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()


class SoftwareStep:
    name = "software"

    def __init__(self, source: SoftwareSource | None, *, python: str = sys.executable) -> None:
        self.source = source
        self.python = python
        self._digest: str | None = None
        self._signature = ""

    def venv(self, ctx: Context) -> Path:
        return ctx.host(ctx.settings.install_folder) / "venv"

    def plan(self, ctx: Context) -> Change:
        venv = self.venv(ctx)
        # The marker: the wheels' sha256, then (since the stat check) their stat signature.
        marker_lines = (read_bytes(venv / MARKER) or b"").decode("ascii", "replace").split("\n")
        marker = marker_lines[0] or None
        installed = marker is not None and (venv / "bin" / "python").exists()
        if self.source is None:
            if installed:
                return Change(changed=False, summary="installed; no new wheel given")
            raise StepError(
                Code.NO_SOFTWARE_SOURCE,
                "no wheel or wheelhouse: pass --wheel FILE or --wheelhouse DIR, put a "
                "wheelhouse/ directory next to the input file, or use --no-software",
            )
        try:
            self._signature = self.source.stat_signature()
            if installed and marker_lines[1:2] == [self._signature]:
                return Change(changed=False)  # cheap check first: same files, same install
            if self._digest is None:
                self._digest = self.source.digest()
        except OSError as exc:
            raise StepError(Code.NO_SOFTWARE_SOURCE, f"cannot read the wheels: {exc}") from exc
        if installed and marker == self._digest:
            return Change(changed=False)
        verb = "reinstall" if installed else "install"
        return Change(
            changed=True,
            summary=f"{verb} {self.source.requirement()} into {ctx.settings.install_folder}/venv",
        )

    def apply(self, ctx: Context, txn: Transaction) -> None:
        assert self.source is not None and self._digest is not None and self._signature
        venv = self.venv(ctx)
        txn.make_dirs(venv.parent)
        txn.move_aside(venv)
        txn.new_tree(venv)
        ctx.runner.run([self.python, "-m", "venv", str(venv)], check=True)
        ctx.runner.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--no-index",
                "--find-links",
                str(self.source.find_links()),
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                self.source.requirement(),
            ],
            check=True,
        )
        atomic_write(venv / MARKER, f"{self._digest}\n{self._signature}\n".encode(), 0o644)

    def installed(self, ctx: Context) -> dict[str, Any]:
        return {"trees": [f"{ctx.settings.install_folder.rstrip('/')}/venv"]}

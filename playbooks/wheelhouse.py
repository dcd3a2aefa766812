"""Build the wheelhouse once: ``pip wheel`` of this repo and its dependencies.

The wheelhouse is cached under ``build/wheelhouse/<digest>`` where the digest covers the
sources that go into the wheel. Reusing the same bytes matters: dtsetup's software step
compares the wheels' sha256, so a rebuilt (timestamp-different) wheel would reinstall on
every run and a second deploy would not report ``changed=0``.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = [
    "PROTOCOL_CONSTANTS",
    "REPO",
    "SOURCES",
    "build_wheelhouse",
    "manifest",
    "source_digest",
    "wheel_protocol",
]

REPO = Path(__file__).resolve().parents[1]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "dtake",
    "dtsetup",
    "resource_agents",
    "schemas",
    "playbooks",
    "tests/infra",  # shipped as playbooks/infra (a symlink in the checkout)
)


def source_digest(repo: Path = REPO) -> str:
    h = hashlib.sha256()
    for top in SOURCES:
        p = repo / top
        files = [p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []
        for f in files:
            if not f.is_file() or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(str(f.relative_to(repo)).encode() + b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def manifest(house: Path) -> dict[str, str]:
    """wheel file name -> sha256, the comparison key of the upload task."""
    out: dict[str, str] = {}
    for f in sorted(house.glob("*.whl")):
        out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# (file in the dtake wheel, module-level constant): the oldest and newest peer protocol
# versions the build speaks (its HELLO offers [MIN, MAX]).
PROTOCOL_CONSTANTS = (
    ("dtake/protocol/auth.py", "MIN_PROTOCOL_VERSION"),
    ("dtake/protocol/framing.py", "PROTOCOL_VERSION"),
)


def _int_constant(source: str, name: str) -> int | None:
    """The value of a module-level ``NAME = <int>`` in SOURCE (None: not there)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        hit = any(isinstance(t, ast.Name) and t.id == name for t in targets)
        if hit and isinstance(value, ast.Constant) and type(value.value) is int:
            return value.value
    return None


def wheel_protocol(house: Path) -> tuple[int, int]:
    """The peer protocol range [MIN, MAX] of the dtake wheel in HOUSE, read from its
    sources inside the wheel (a zip) without installing it. ValueError says what is
    missing: no or several dtake wheels, a file or a constant not found."""
    wheels = sorted(house.glob("dtake-*.whl"))
    if len(wheels) != 1:
        found = ", ".join(w.name for w in wheels) or "none"
        raise ValueError(f"expected one dtake wheel in {house}, found {found}")
    values: list[int] = []
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            for member, name in PROTOCOL_CONSTANTS:
                try:
                    source = z.read(member).decode("utf-8")
                except KeyError:
                    raise ValueError(f"{wheels[0].name}: no {member} in the wheel") from None
                value = _int_constant(source, name)
                if value is None:
                    raise ValueError(f"{wheels[0].name}: no `{name} = <int>` in {member}")
                values.append(value)
    except (zipfile.BadZipFile, SyntaxError, UnicodeDecodeError) as e:
        raise ValueError(f"{wheels[0].name}: unreadable ({type(e).__name__}: {e})") from e
    lo, hi = values
    if lo > hi:
        raise ValueError(f"{wheels[0].name}: protocol range [{lo}, {hi}] is empty")
    return lo, hi


def build_wheelhouse(
    *, repo: Path = REPO, cache: Path | None = None, python: str = sys.executable
) -> tuple[Path, bool]:
    """(wheelhouse dir, built now?). Reuses the cached one for unchanged sources."""
    cache = cache or repo / "build" / "wheelhouse"
    house = cache / source_digest(repo)
    if (house / ".complete").exists():
        return house, False
    tmp = cache / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run(
        [python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(tmp), str(repo)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"pip wheel failed: {r.stderr.strip()[-2000:]}")
    (tmp / ".complete").write_text("\n".join(sorted(manifest(tmp))) + "\n")
    try:
        os.replace(tmp, house)
    except OSError:  # another run built the same sources meanwhile: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (house / ".complete").exists():
            raise
    return house, True

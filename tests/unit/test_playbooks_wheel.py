"""The playbooks ship in the dtake wheel: built with the wheelhouse helper, installed into a
throwaway venv offline, ``python -m playbooks`` runs from there with its data (the cluster
schema, the testinfra suites)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from playbooks.wheelhouse import REPO, build_wheelhouse

pytestmark = pytest.mark.slow

MODULES = {
    "__init__",
    "__main__",
    "cli",
    "cluster",
    "deploy",
    "resources",
    "spec",
    "upgrade",
    "verify",
    "wheelhouse",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    house, _ = build_wheelhouse()
    wheel = next(house.glob("dtake-*.whl"))
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "--no-index",
            "--disable-pip-version-check",
            "--find-links",
            str(house),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    yield wheel, venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # from / : nothing of the checkout on sys.path, only what the wheel installed
    return subprocess.run(
        [str(venv / "bin" / "python"), *args], capture_output=True, text=True, cwd="/", timeout=120
    )


def test_the_wheel_holds_the_playbooks_and_their_data(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"playbooks/{m}.py" for m in MODULES} <= names, sorted(names)
    for f in ("conftest.py", "infra_facts.py", "test_node.py", "test_cluster.py"):
        assert f"playbooks/infra/{f}" in names
    assert "dtake/schemas/cluster.schema.json" in names
    assert not [n for n in names if n.startswith(("tests/", "lab/", "playbooks/infra/__pycache__"))]


def test_python_m_playbooks_runs_from_the_installed_wheel(installed: tuple[Path, Path]) -> None:
    _, venv = installed
    r = _run(venv, "-m", "playbooks", "--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("deploy", "cluster", "resources", "verify", "upgrade", "validate"):
        assert cmd in r.stdout
    where = _run(venv, "-c", "import playbooks, sys; print(playbooks.__file__)")
    assert "site-packages" in where.stdout and str(REPO) not in where.stdout, where
    # its data: the cluster schema (validate) and the testinfra suites (verify)
    ok = _run(venv, "-m", "playbooks", "validate", "--spec", str(REPO / "vagrant" / "cluster.yaml"))
    assert ok.returncode == 0 and "valid" in ok.stdout, ok.stdout + ok.stderr
    bad = _run(venv, "-m", "playbooks", "validate", "--spec", "/nonexistent.yaml")
    assert bad.returncode == 1 and "SPEC_UNREADABLE" in bad.stdout, bad.stdout + bad.stderr
    infra = _run(venv, "-c", "from playbooks.verify import INFRA_DIR; print(INFRA_DIR)")
    d = Path(infra.stdout.strip())
    assert "site-packages" in str(d) and (d / "test_node.py").is_file(), infra
    # deploy outside a checkout needs a prebuilt wheelhouse, and says so
    ini = venv.parent / "DTSetup.ini"
    ini.write_text("[Config]\n")
    r = _run(venv, "-m", "playbooks", "deploy", "--hosts", "n1", "--ini", str(ini))
    assert r.returncode == 1 and "--wheelhouse" in r.stdout, r.stdout + r.stderr
    assert not (venv.parent / "dtake-cluster.key").exists()

"""Fixtures for dtsetup integration tests: a throwaway root, tree snapshots, a small fake
dtake wheel (a real wheel, installed by real pip, whose ``dtake serve`` listens on the
configured port and reports READY=1 like the real Type=notify service)."""

from __future__ import annotations

import base64
import hashlib
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dtsetup_support import CODE, FULL_KEYS, ini_text

REPO = Path(__file__).resolve().parents[3]

FAKE_SERVICE = """\
import os, re, signal, socket, sys


def main():
    args = sys.argv[1:]
    if args[:1] != ["serve"]:
        print("fake dtake: only serve", file=sys.stderr)
        return 2
    config = open(args[args.index("--config") + 1]).read()
    port = int(re.search(r"^port: (\\d+)$", config, re.M).group(1))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen()
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"READY=1", notify)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        conn, _ = srv.accept()
        conn.close()
"""


def build_fake_wheel(directory: Path, version: str = "0.0.1") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"dtake-{version}.dist-info"
    files = {
        "fake_dtake/__init__.py": FAKE_SERVICE,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: dtake\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": "[console_scripts]\ndtake = fake_dtake:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = directory / f"dtake-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


@pytest.fixture(scope="session")
def fake_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    house = tmp_path_factory.mktemp("wheelhouse")
    build_fake_wheel(house)
    return house


@pytest.fixture(scope="session")
def repo_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel`` of this repository and its dependencies (the real software), once per
    session, for the ``slow`` tests."""
    house = tmp_path_factory.mktemp("repo-wheelhouse")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(house), str(REPO)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    return house


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A throwaway root with the files a real one has for groupadd."""
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc/group").write_text("root:x:0:\nusers:x:100:\n")
    (r / "etc/gshadow").write_text("root:*::\nusers:*::\n")
    (r / "etc/gshadow").chmod(0o640)
    return r


# shadow-utils' own backups (groupadd/groupdel write /etc/group- and /etc/gshadow-, on
# real hosts too); what counts is that /etc/group and /etc/gshadow are restored.
IGNORED = {"etc/group-", "etc/gshadow-"}


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root -> (mode, content digest or link target)."""
    found: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in IGNORED:
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            found[rel] = (st.st_mode, "->" + str(path.readlink()))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = (st.st_mode, "dir")
        else:
            found[rel] = (st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.fixture(name="snapshot")
def snapshot_fixture() -> Callable[[Path], dict[str, tuple[int, str]]]:
    return snapshot


@pytest.fixture
def code() -> str:
    return CODE


@pytest.fixture
def ini(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "DTSetup.ini", section: str = "Config", **keys: str) -> Path:
        directory = tmp_path / "media"
        directory.mkdir(exist_ok=True)
        path = directory / name
        path.write_text(ini_text(section, FULL_KEYS | keys))
        return path

    return make

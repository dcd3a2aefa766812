"""A real ``dtsetup apply`` to ``/`` of a throwaway host (new mount, network, PID and UTS
namespaces, overlays over /etc, /opt, /var, /usr/lib/ocf and /root, a fresh /run: see
nsbox.py), checked with pytest-testinfra through nsenter: the software installed into
DOUBLETAKEFOLDER from a wheelhouse by real pip, config, key and record with their modes,
groups, the OCF agents, the supervisor running the service (no systemd runs here),
the port listening and accepting, the nftables table. A second apply changes nothing,
the silent command line too, and uninstall leaves nothing behind: no process, no nft
table, no file (the overlays' upper layers hold nothing this machine does not).

This machine's /etc, groups and nftables ruleset are compared before, during and after:
they never change. Needs root, unshare, nsenter, nft and overlayfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.dtsetup.nsbox import NsBox, leftovers, real_entry

DTSETUP = str(Path(sys.executable).parent / "dtsetup")
REPO = Path(__file__).resolve().parents[3]
HOSTNAME = "dtnode"
PORT = 6391  # in the box's own network namespace: cannot clash with this machine's ports

# What dtsetup writes on a host (docs/dtsetup.md), watched on this machine.
WATCHED = (
    "/etc/group",
    "/etc/gshadow",
    "/etc/dtake",
    "/etc/default/dtake",
    "/etc/systemd/system/dtake.service",
    "/etc/systemd/system/multi-user.target.wants/dtake.service",
    "/opt/dtake",
    "/var/lib/dtake",
    "/var/log/dtake",
    "/run/dtake",
    "/usr/lib/ocf/resource.d/dtake",
)
# shadow-utils' own backups, written by groupadd/groupdel on any host
SHADOW_BACKUPS = {"/etc/group-", "/etc/gshadow-"}


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, nftables)"
    for tool in ("unshare", "nsenter", "nft", "ip", "ss", "groupadd"):
        if shutil.which(tool) is None:
            return f"needs {tool} (make deps)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "needs overlayfs (modprobe overlay)"
    for path in ("/etc", "/opt", "/var", "/usr/lib/ocf", "/root"):
        if not os.path.isdir(path):
            return f"needs {path} to exist (overlay mount point)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def host_state() -> dict[str, Any]:
    """This machine's side of everything dtsetup touches."""
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False)
    groups = subprocess.run(
        ["getent", "group", "dtadmin", "dtmon"], capture_output=True, text=True, check=False
    )
    return {
        "paths": {p: real_entry(p) for p in WATCHED},
        "nft_ruleset": (nft.returncode, nft.stdout),
        "groups": groups.stdout,
        "hostname": os.uname().nodename,
    }


@pytest.fixture
def box(tmp_path: Path) -> Iterator[NsBox]:
    b = NsBox(tmp_path / "box", HOSTNAME)
    try:
        b.start()
        yield b
    finally:
        b.stop()


def make_media(directory: Path, wheelhouse: Path, code: str) -> Path:
    """The seed's setup directory: DTSetup.ini with the install files (a wheelhouse)
    beside it [L684]. [Config] differs from [dtnode] so the machine section is seen to
    win by the box's real host name (no --host)."""
    d = directory / "media"
    d.mkdir()
    (d / "wheelhouse").symlink_to(wheelhouse)
    common = (
        f"DTSETUPTYPE=DTNT\nDTACTIVATIONCODE={code}\nDOUBLETAKEFOLDER=/opt/dtake\n"
        "QMEMORYBUFFERMAX=128\nDISKQUEUEFOLDER=/var/lib/dtake/queue\nDISKQUEUEMAXSIZE=2048\n"
        "DISKFREESPACEMIN=50\nDTSERVICESTARTUP=Y\nSET_FWPORT=Y\n"
    )
    (d / "DTSetup.ini").write_text(
        f"[Config]\n{common}PORT=6320\n\n[{HOSTNAME}]\n{common}PORT={PORT}\n"
    )
    return d / "DTSetup.ini"


@pytest.fixture
def media(tmp_path: Path, fake_wheelhouse: Path, code: str) -> Path:
    return make_media(tmp_path, fake_wheelhouse, code)


def _agents(ini: Path) -> Path:
    """A copy of resource_agents/ taken once per test, beside the input file: a rerun
    must compare against the same agents even while someone edits the repository."""
    copy = ini.parent / "agents"
    if not copy.exists():
        shutil.copytree(
            REPO / "resource_agents", copy, ignore=shutil.ignore_patterns("__pycache__")
        )
    return copy


def _apply_json(box: NsBox, ini: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    done = box.run(
        DTSETUP, "apply", str(ini), "--json", "--agents-dir", str(_agents(ini)), *extra, env=env
    )
    assert done.returncode in (0, 1, 2), done.stdout + done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    assert data["exit_code"] == done.returncode
    return data


def test_real_apply_in_namespace_box(
    box: NsBox, media: Path, code: str, snapshot: Callable[[Path], Any]
) -> None:
    before = host_state()
    host = box.host()
    assert host.run("hostname").stdout.strip() == HOSTNAME
    assert host.run("nft list ruleset").stdout.strip() == ""  # the box's own, empty ruleset
    assert box.upper_listing() == {}  # nothing written yet

    # -- first apply: everything changes ------------------------------------------------
    first = _apply_json(box, media)
    assert first["exit_code"] == 2, first
    assert first["section"] == HOSTNAME
    status = {s["name"]: s["status"] for s in first["steps"]}
    assert status == {
        "folders": "changed",
        "software": "changed",
        "groups": "changed",
        "config": "changed",
        "authkey": "changed",
        "agents": "changed",
        "service": "changed",
        "firewall": "changed",
        "record": "changed",
    }
    assert "(nftables)" in {s["name"]: s["summary"] for s in first["steps"]}["firewall"]

    # -- the installed host, seen by testinfra inside the box ---------------------------
    dtake = host.file("/opt/dtake/venv/bin/dtake")
    assert dtake.is_file and dtake.mode & 0o111
    assert host.run("/opt/dtake/venv/bin/python -c 'import fake_dtake'").rc == 0
    config = host.file("/etc/dtake/dtake.yaml")
    assert (config.mode, config.user, config.group) == (0o644, "root", "root")
    assert f"port: {PORT}" in config.content_string
    assert "disk_max_mb: 2048" in config.content_string
    key = host.file("/etc/dtake/authkey")
    assert (key.mode, key.user) == (0o600, "root")
    assert len(key.content_string) == 65 and key.content_string.endswith("\n")
    record = host.file("/etc/dtake/dtsetup.json")
    assert record.mode == 0o600
    for folder, mode in (("/var/lib/dtake", 0o750), ("/var/lib/dtake/queue", 0o750)):
        assert host.file(folder).is_directory and host.file(folder).mode == mode
    assert host.group("dtadmin").exists and host.group("dtmon").exists
    agent = host.file("/usr/lib/ocf/resource.d/dtake/SourceConnection")
    assert agent.mode == 0o755
    assert agent.content_string.splitlines()[0] == "#!/opt/dtake/venv/bin/python"
    assert "DTAKE_AUTOSTART=yes" in host.file("/etc/default/dtake").content_string
    assert host.file("/opt/dtake/libexec/dtake-supervisor").mode == 0o755

    pidfile = host.file("/run/dtake/dtake.pid")
    assert pidfile.exists
    supervisor = host.process.get(pid=int(pidfile.content_string))
    assert "dtake-supervisor" in supervisor.args
    service = host.process.get(ppid=supervisor.pid)
    assert "serve --config /etc/dtake/dtake.yaml" in service.args
    assert host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
    assert host.run(f"bash -c 'exec 3<>/dev/tcp/127.0.0.1/{PORT}'").rc == 0

    table = host.run("nft list table inet dtake")
    assert table.rc == 0
    assert f"tcp dport {PORT} accept" in table.stdout
    assert f"udp dport {PORT} accept" in table.stdout

    secret = box.run(DTSETUP, "export", "--format", "ini")
    assert secret.returncode == 0 and f"PORT={PORT}" in secret.stdout
    assert code not in secret.stdout  # activation codes left out of export

    assert host_state() == before  # this machine saw none of it, even while it ran

    # -- again: nothing changes (--json, then the seed's silent command line) -----------
    again = _apply_json(box, media)
    assert again["exit_code"] == 0 and again["recap"]["changed"] == 0, again
    # The silent form takes no options: it installs the repository's resource_agents/,
    # the same bytes as the copy above unless someone saves an agent in between.
    silent = box.run("bash", "-c", f'{DTSETUP} /s /v"DTSETUPINI=\\"{media}\\" /qn"')
    assert (silent.returncode, silent.stdout, silent.stderr) == (0, "", "")
    assert int(host.file("/run/dtake/dtake.pid").content_string) == supervisor.pid

    # -- uninstall: nothing left ---------------------------------------------------------
    gone = box.run(DTSETUP, "uninstall", "--json")
    assert gone.returncode == 2, gone.stdout + gone.stderr
    assert not host.file("/run/dtake/dtake.pid").exists
    assert host.run(f"test -d /proc/{supervisor.pid}").rc != 0
    assert host.run(f"test -d /proc/{service.pid}").rc != 0
    assert not host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
    assert host.run("nft list table inet dtake").rc != 0
    assert host.run("nft list ruleset").stdout.strip() == ""
    assert not host.group("dtadmin").exists and not host.group("dtmon").exists
    for path in ("/opt/dtake", "/etc/dtake", "/var/lib/dtake", "/usr/lib/ocf/resource.d/dtake"):
        assert not host.file(path).exists, path
    assert leftovers(box.upper_listing(), SHADOW_BACKUPS) == {}

    box.stop()
    after = host_state()
    assert after == before
    assert str(box.stage) not in Path("/proc/self/mountinfo").read_text()
    assert not any(box.stage.iterdir())  # the tmpfs went with the box


FAILING_NFT = """#!/bin/sh
# nft that refuses to load a ruleset (a kernel without nf_tables, a broken rule): the
# last change step fails after everything before it was applied for real.
case "$1" in -f) echo "nft: injected failure" >&2; exit 1;; esac
exec /usr/sbin/nft "$@"
"""


def test_failure_midway_leaves_box_as_before(box: NsBox, media: Path, tmp_path: Path) -> None:
    before = host_state()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nft").write_text(FAILING_NFT)
    (bindir / "nft").chmod(0o755)
    path = f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    data = _apply_json(box, media, env={"PATH": path})
    assert data["exit_code"] == 1, data
    status = {s["name"]: s["status"] for s in data["steps"]}
    assert status["firewall"] == "failed"
    assert status["record"] == "skipped"
    for step in ("folders", "software", "groups", "config", "authkey", "agents", "service"):
        assert status[step] == "rolled_back", status
    assert "STEP_FAILED" in {r["code"] for r in data["reports"]}
    host = box.host()
    assert not host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
    # the service started by the service step was stopped ([r]: not this shell itself)
    assert host.run("pgrep -f dtake-superviso[r]").rc == 1
    assert not host.group("dtadmin").exists
    assert leftovers(box.upper_listing(), SHADOW_BACKUPS) == {}
    assert host_state() == before


@pytest.mark.slow
def test_real_service_in_namespace_box(
    box: NsBox, tmp_path: Path, repo_wheelhouse: Path, code: str
) -> None:
    """The real software from this repository's wheelhouse: the real ``dtake serve``
    takes the config, key and folders dtsetup wrote, reports READY=1 to the supervisor,
    listens on PORT and answers on its control socket; uninstall stops it."""
    before = host_state()
    media = make_media(tmp_path, repo_wheelhouse, code)
    first = _apply_json(box, media)
    assert first["exit_code"] == 2, first
    host = box.host()
    pid = int(host.file("/run/dtake/dtake.pid").content_string)
    service = host.process.get(ppid=pid)
    assert service.args.startswith("/opt/dtake/venv/bin/python /opt/dtake/venv/bin/dtake serve")
    assert host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
    status = host.run("/opt/dtake/venv/bin/dtake --socket /run/dtake/dtake.sock --json status")
    assert status.rc == 0, status.stderr
    json.loads(status.stdout)
    again = _apply_json(box, media)
    assert again["exit_code"] == 0, again

    gone = box.run(DTSETUP, "uninstall")
    assert gone.returncode == 2, gone.stdout + gone.stderr
    assert host.run(f"test -d /proc/{service.pid}").rc != 0
    assert not host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
    assert host.run("nft list ruleset").stdout.strip() == ""
    left = leftovers(box.upper_listing(), SHADOW_BACKUPS)
    # What the service itself wrote into its state folder is its data: kept (docs).
    assert all(p.startswith("/var/lib/dtake") for p in left), sorted(left)
    assert host_state() == before

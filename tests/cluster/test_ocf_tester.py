"""Stock ``ocf-tester`` (resource-agents) against both agents, with real dtake services.

The agents are installed the way nodes get them (``resource_agents.install``, absolute
interpreter; ``/usr/bin/python3`` here because ocf-tester runs meta-data as ``nobody``,
who cannot enter /root where the venv's interpreter lives). Everything runs inside a
private mount namespace (``unshare -m``): the read-only bind mounts of the target copy
vanish with it, so a failed run leaves no mount on the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cluster

RUNNER = r"""
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from dtake.protocol.auth import generate_key_file
from dtake.testing import ServiceProcess

root, agents, which = sys.argv[2], sys.argv[3], sys.argv[4]
key = os.path.join(root, "key")
generate_key_file(key)
a = ServiceProcess(os.path.join(root, "a"), "a", key).start()
b = ServiceProcess(os.path.join(root, "b"), "b", key).start()
rc = 1
try:
    data = os.path.join(root, "data")
    os.makedirs(data)
    with open(os.path.join(data, "file"), "w") as fh:
        fh.write("payload")
    sock = f"socket={a.socket_path}"
    if which == "ReplicatedDisk":
        opts = ["-o", f"directory={data}", "-o", sock]
    else:
        opts = ["-o", "repset=rs", "-o", f"rules={data} inc, rec", "-o", "target=127.0.0.1",
                "-o", f"port={b.port}", "-o", f"target_path={root}/target", "-o", sock]
    r = subprocess.run(["ocf-tester", "-n", "t-" + which, *opts, os.path.join(agents, which)],
                       capture_output=True, text=True, timeout=240)
    print(r.stdout + r.stderr)
    rc = r.returncode
finally:
    a.stop()
    b.stop()
sys.exit(rc)
"""


def _require() -> None:
    packages = {
        "ocf-tester": "resource-agents",
        "unshare": "util-linux",
        "xmllint": "libxml2-utils",
    }
    missing = [t for t in packages if shutil.which(t) is None]
    if os.geteuid() != 0 or missing or not os.path.exists("/usr/bin/python3"):
        hint = " ".join(packages[t] for t in missing) or "resource-agents"
        msg = f"needs root and {', '.join(missing) or 'nothing else'} (apt-get install {hint}; make deps installs them)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


@pytest.mark.parametrize("agent", ["ReplicatedDisk", "SourceConnection"])
def test_ocf_tester_passes(agent: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    _require()
    sys.path.insert(0, str(ROOT))
    from resource_agents.install import install

    # ocf-tester runs meta-data as nobody: the agents live where nobody can reach them
    # (pytest's tmp_path is below a 0700 directory).
    agents = Path(tempfile.mkdtemp(prefix="dtake-ocft-"))
    request.addfinalizer(lambda: shutil.rmtree(agents, ignore_errors=True))
    os.chmod(agents, 0o755)
    install(str(agents), "/usr/bin/python3")
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "run.py"
    script.write_text(RUNNER)
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            str(script),
            str(ROOT),
            str(work),
            str(agents),
            agent,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"{agents}/{agent} passed all tests" in out

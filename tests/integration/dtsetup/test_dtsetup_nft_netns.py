"""The real nftables backend, inside a throwaway network namespace (``unshare --net``),
so this machine's firewall is never touched: rule present after apply, table gone after
uninstall. Needs root and nft (``make deps`` installs nftables)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = """
import json, subprocess, sys
from pathlib import Path
from dtsetup import actions
ini, root = Path(sys.argv[1]), Path(sys.argv[2])
o = actions.ApplyOptions(host="n", root=root, no_software=True, init="none", firewall="nftables",
                         agents_dir=root.parent / "agents")
first = actions.apply(ini, o).exit_code
listing = subprocess.run(["nft", "list", "table", "inet", "dtake"], capture_output=True, text=True).stdout
second = actions.apply(ini, o).exit_code
removed = actions.uninstall(root=root).exit_code
after = subprocess.run(["nft", "list", "table", "inet", "dtake"], capture_output=True, text=True).returncode
print(json.dumps([first, listing, second, removed, after]))
"""

needs = pytest.mark.skipif(
    shutil.which("nft") is None or shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs root, unshare and nft (make deps installs nftables)",
)


@needs
def test_nftables_rule_in_throwaway_netns(root: Path, ini: Callable[..., Path]) -> None:
    out = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", SCRIPT, str(ini(PORT="6390")), str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    first, listing, second, removed, after = json.loads(out.stdout)
    assert first == 2
    assert "tcp dport 6390 accept" in listing and "udp dport 6390 accept" in listing
    assert second == 0
    assert removed == 2
    assert after != 0  # the table is gone

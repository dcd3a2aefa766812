"""The whole demo flow (``make demo``) as a test: lab up, install through the playbooks,
cluster, resources, second run unchanged, failover with every acknowledged write intact,
reboot + resync, online pending resolved with ``dtake grd accept``, lab down."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from lab import Lab
from lab.pytest_plugin import _unique_prefix, require_lab
from playbooks.demo import run_demo

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_demo_end_to_end(tmp_path: Path) -> None:
    prefix = _unique_prefix()
    lab = Lab(prefix=prefix, n=3)
    require_lab(lab)
    out = io.StringIO()
    try:
        report = run_demo(prefix=prefix, workdir=tmp_path / "demo", out=out)
    finally:
        lab.down()
    text = out.getvalue()
    assert report.ok, text[-4000:]
    stages = [name for name, _ in report.stages]
    assert stages[0].startswith("lab up") and stages[-1] == "lab down"
    assert any(s.startswith("kill ") for s in stages)
    assert any(s.startswith("online pending") for s in stages)
    # the second run of every playbook changed nothing
    for key in ("deploy#2", "cluster#2", "resources#2"):
        assert not report.playbooks[key].changed, report.playbooks[key].render()
    assert report.playbooks["resources"].changed
    facts = report.facts
    assert facts["acknowledged writes lost at failover"] == 0
    assert int(facts["files written and acknowledged"]) >= 300
    assert str(facts["online pending resolved by"]).startswith("dtake grd accept data on ")
    assert "dtake demo: PASSED" in text and "Data integrity not guaranteed." in text
    # nothing left behind
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{prefix}-" not in netns
    assert not os.path.exists(lab.state_dir)

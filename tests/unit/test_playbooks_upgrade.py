"""The rolling upgrade [L503-507] on scripted hosts: plan, protocol check, order, resync
gate, stuck move."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from playbooks.cli import _parser
from playbooks.deploy import DeployOptions
from playbooks.pacemaker import parse_crm_mon
from playbooks.recap import EXIT_FAILED, EXIT_OK, EXIT_SPEC
from playbooks.testing import (
    ScriptedRemote,
    converged_host,
    fake_dtake_wheel,
    fresh_host,
    running_host,
    scripted_connector,
)
from playbooks.upgrade import OK_TEXT, in_sync, status_protocol, upgrade
from playbooks.wheelhouse import REPO, wheel_protocol

NODES = ["node1", "node2", "node3"]


def crm_mon(promoted: str | None, attrs: dict[str, dict[str, str]] | None = None) -> str:
    """crm_mon XML: a ReplicatedDisk clone promoted on PROMOTED (None: nowhere)."""
    inst = []
    for n in NODES:
        role = "Promoted" if n == promoted else "Unpromoted"
        inst.append(
            f'<resource id="data" resource_agent="ocf:dtake:ReplicatedDisk" role="{role}" '
            f'active="true" failed="false"><node name="{n}" id="1"/></resource>'
        )
    nodes = "".join(f'<node name="{n}" online="true" standby="false"/>' for n in NODES)
    na = "".join(
        f'<node name="{n}">'
        + "".join(f'<attribute name="{k}" value="{v}"/>' for k, v in a.items())
        + "</node>"
        for n, a in (attrs or {}).items()
    )
    return (
        '<pacemaker-result><summary><current_dc present="true" name="node1" '
        f'with_quorum="true"/></summary><nodes>{nodes}</nodes><resources>'
        f'<clone id="data-clone" multi_state="true">{"".join(inst)}</clone></resources>'
        f"<node_attributes>{na}</node_attributes></pacemaker-result>"
    )


def synced(promoted: str) -> dict[str, dict[str, str]]:
    return {
        n: {
            "dtake-data-state": "good",
            "dtake-data-status": OK_TEXT,
            "master-data": "10000" if n == promoted else "1000",
        }
        for n in NODES
    }


def _opts(tmp: Path, protocol: tuple[int, int] | None = (2, 2)) -> DeployOptions:
    house = tmp / "wh"
    fake_dtake_wheel(house, protocol=protocol)
    ini = tmp / "DTSetup.ini"
    ini.write_text("[Config]\nDTACTIVATIONCODE=123456789012345678901234\n")
    key = tmp / "key"
    key.write_text("ab" * 32 + "\n")
    return DeployOptions(ini=ini, wheelhouse=house, auth_key=key)


def _pacemaker(r: ScriptedRemote, *, before: str, after: str | None) -> None:
    """Scripts the control node: status says BEFORE is active (twice: pick the node, then
    just before the move), then AFTER once the held node is in standby."""
    r.script(r"--inactive$", times=2, stdout=crm_mon(before))
    r.script(r"--inactive$", stdout=crm_mon(after))
    r.script(r"--inactive -A$", stdout=crm_mon(before, synced(before)))
    r.script(r"^crm_attribute --node \S+ --name standby")
    r.script(r"^crm_resource --wait")


def test_in_sync_wants_one_promoted_copy_and_every_target_good() -> None:
    assert in_sync(parse_crm_mon(crm_mon("node1", synced("node1")))) is None
    assert "no node" in str(in_sync(parse_crm_mon(crm_mon(None, synced("node1")))))
    a = synced("node1")
    a["node3"]["dtake-data-state"] = "pending"
    assert in_sync(parse_crm_mon(crm_mon("node1", a))) == "data on node3: data pending"
    a = synced("node1")
    del a["node2"]["master-data"]
    assert "node2: no promotion score" in str(in_sync(parse_crm_mon(crm_mon("node1", a))))
    a = synced("node1")
    a["node1"]["dtake-data-status"] = "Target node2 is pending."
    assert "Target node2 is pending." in str(in_sync(parse_crm_mon(crm_mon("node1", a))))


def test_every_host_current_nothing_is_touched(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    remotes = {n: converged_host(n, o) for n in NODES}
    res = upgrade(NODES, scripted_connector(remotes), o)
    assert res.exit_code == EXIT_OK and not res.changed, res.render()
    for r in remotes.values():
        assert not r.ran(r"crm_attribute|crm_resource|put|dtsetup apply (?!.*--check)")
        assert not r.unexpected


def test_others_first_then_the_move_then_the_last_node(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    remotes = {n: fresh_host(n) for n in NODES}
    _pacemaker(remotes["node1"], before="node2", after="node1")
    res = upgrade(NODES, scripted_connector(remotes), o, sync_timeout=5)
    assert res.exit_code == EXIT_OK, res.render()
    assert all(not r.unexpected for r in remotes.values())
    ctl = remotes["node1"].calls

    def at(pattern: str) -> int:
        hits = [i for i, c in enumerate(ctl) if re.search(pattern, c)]
        assert hits, pattern
        return hits[0]

    # node2 holds the resources; node1 and node3 go to standby and are upgraded first
    real_apply = r"dtsetup apply (?!.*--check)"
    assert at("--node node1 --name standby --update on") < at(real_apply)
    assert at("--node node3 --name standby --update on") < at("--node node3 .* --update off")
    # the move waits for the resync of the upgraded targets
    move = at("--node node2 --name standby --update on")
    assert at("--node node1 --name standby --update off") < move
    assert any(c.endswith("--inactive -A") for c in ctl[at("--node node1 .* --update off") : move])
    # node2 is upgraded last, in standby, then comes back
    assert move < at("--node node2 --name standby --update off")
    assert len(remotes["node2"].ran(real_apply)) == 1
    by = {h.host: h for h in res.hosts}
    assert next(t.name for t in by["node2"].tasks if t.changed) == "move resources"


def test_a_move_that_promotes_nothing_puts_the_held_node_back(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    remotes = {n: fresh_host(n) for n in NODES}
    _pacemaker(remotes["node1"], before="node2", after=None)
    res = upgrade(NODES, scripted_connector(remotes), o, sync_timeout=5)
    assert res.exit_code == EXIT_FAILED, res.render()
    ctl = remotes["node1"].calls
    on = ctl.index("crm_attribute --node node2 --name standby --update on --lifetime forever")
    off = ctl.index("crm_attribute --node node2 --name standby --update off --lifetime forever")
    assert on < off
    # the held node was not upgraded
    assert not remotes["node2"].ran(r"dtsetup apply (?!.*--check)")
    assert "not promoted on an upgraded node" in res.render()


def test_a_host_that_cannot_be_planned_stops_before_anything_changes(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    remotes = {n: fresh_host(n) for n in NODES[:2]}
    res = upgrade(NODES, scripted_connector(remotes, unreachable=("node3",)), o)
    assert res.exit_code != EXIT_OK and not res.changed, res.render()
    assert all(not r.ran(r"crm_attribute|put ") for r in remotes.values())
    assert {h.host: bool(h.unreachable) for h in res.hosts}["node3"]


def test_targets_that_do_not_resync_stop_the_roll_before_the_move(tmp_path: Path) -> None:
    """E.g. a new version the old one cannot replicate to (rolled with
    --allow-protocol-break): the resources stay on the held node, and the failure says why
    (the source's replication errors)."""
    o = _opts(tmp_path)
    remotes = {n: fresh_host(n) for n in NODES}
    ctl = remotes["node1"]
    ctl.script(r"--inactive$", stdout=crm_mon("node2"))
    stale = synced("node2")
    stale["node2"]["dtake-data-status"] = "Target node1 is pending. Data integrity not guaranteed."
    ctl.script(r"--inactive -A$", stdout=crm_mon("node2", stale))
    ctl.script(r"^crm_attribute --node \S+ --name standby")
    ctl.script(r"^crm_resource --wait")
    err = "Connection failed: peer speaks protocol version 2, this node 1 (error -157)"
    status = {"connections": [{"target": "node1:6320", "state": "Error", "last_error": err}]}
    # no "protocol" key: a protocol-1 build, refused by the plan without the flag
    remotes["node2"].script(r"dtake --json status$", stdout=json.dumps(status), first=True)
    res = upgrade(NODES, scripted_connector(remotes), o, sync_timeout=0, allow_protocol_break=True)
    assert res.exit_code == EXIT_FAILED, res.render()
    text = res.render()
    assert "WARNING PROTOCOL_BREAK" in text
    assert "stopped before the move, resources stay on node2" in text
    assert "Target node1 is pending" in text and err in text
    assert not ctl.ran("--node node2 --name standby --update on")
    assert not remotes["node2"].ran(r"dtsetup apply (?!.*--check)")
    assert ctl.ran("--node node3 --name standby --update off")  # upgraded ones are back


# ------------------------------------------------------------ peer protocol compatibility
# What a refused plan may run: the check-mode deploy and the status query, nothing else.
READ_ONLY = re.compile(r"^uname -n$|^test -d |^sha256sum |^ls |^cat |dtake --json status$")


def test_status_protocol_absent_key_is_protocol_1() -> None:
    assert status_protocol({"version": "0.1.0"}) == (1, 1)
    assert status_protocol({"protocol": [2, 3]}) == (2, 3)
    for bad in ([3, 2], [2], "2", [0, 1], [1.0, 2]):
        with pytest.raises(ValueError):
            status_protocol({"protocol": bad})


def test_wheel_protocol_reads_this_trees_constants(tmp_path: Path) -> None:
    """The range read from a wheel holding this tree's protocol modules is the one they
    define (a change of how the constants are written fails here, not in a roll)."""
    from dtake.protocol.auth import MIN_PROTOCOL_VERSION
    from dtake.protocol.framing import PROTOCOL_VERSION

    with zipfile.ZipFile(tmp_path / "dtake-9.9-py3-none-any.whl", "w") as z:
        for rel in ("dtake/protocol/auth.py", "dtake/protocol/framing.py"):
            z.write(REPO / rel, rel)
    assert wheel_protocol(tmp_path) == (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)


def test_a_wheel_without_the_constants_is_refused_before_any_host(tmp_path: Path) -> None:
    o = _opts(tmp_path, protocol=None)
    remotes = {n: fresh_host(n) for n in NODES}
    res = upgrade(NODES, scripted_connector(remotes), o)
    assert res.exit_code == EXIT_SPEC, res.render()
    assert [f.code for f in res.findings] == ["NO_PROTOCOL"]
    assert "no dtake/protocol/auth.py in the wheel" in res.render()
    assert all(not r.calls for r in remotes.values())


def test_overlapping_protocols_roll(tmp_path: Path) -> None:
    o = _opts(tmp_path, protocol=(2, 3))
    remotes = {n: running_host(n, (1, 2)) for n in NODES}
    _pacemaker(remotes["node1"], before="node2", after="node1")
    res = upgrade(NODES, scripted_connector(remotes), o, sync_timeout=5)
    assert res.exit_code == EXIT_OK and not res.findings, res.render()
    assert all(not r.unexpected for r in remotes.values())
    for h in res.hosts:
        t = next(t for t in h.tasks if t.name == "protocol")
        assert t.msg == "runs dtake 0.1.0, protocol [1, 2], the new build [2, 3]"
    assert len(remotes["node2"].ran(r"dtsetup apply (?!.*--check)")) == 1


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(None, id="no-protocol-key"),
        pytest.param("service down", id="status-fails"),
    ],
)
def test_no_common_protocol_is_refused_before_any_change(
    tmp_path: Path, status: str | None
) -> None:
    o = _opts(tmp_path)
    remotes = {n: running_host(n, None) for n in NODES}
    if status:
        remotes["node3"].script(r"dtake --json status$", rc=1, stderr=status, first=True)
    res = upgrade(NODES, scripted_connector(remotes), o)
    assert res.exit_code == EXIT_FAILED, res.render()
    for r in remotes.values():
        assert r.calls and all(READ_ONLY.search(c) for c in r.calls), r.calls
        assert not r.unexpected and not r.files
    doc = json.loads(res.to_json())
    assert doc["exit_code"] == EXIT_FAILED and not doc["changed"]
    (f,) = doc["findings"]
    assert f["code"] == "PROTOCOL_BREAK" and f["severity"] == "error"
    assert f["message"].startswith(
        "no common peer protocol version between the new build ([2, 2]) and node1, node2"
    )
    assert "(runs dtake 0.1.0, protocol [1, 1])" in f["message"]
    assert "--allow-protocol-break" in f["message"]
    tasks = {h["host"]: h["tasks"][-1] for h in doc["hosts"]}
    assert tasks["node1"]["status"] == "failed"
    assert tasks["node1"]["msg"] == (
        "runs dtake 0.1.0, protocol [1, 1], the new build [2, 2]: no common version: "
        "refused, nothing changed"
    )
    if status:
        assert "cannot tell its protocol" in tasks["node3"]["msg"]
        assert "service down: refused" in tasks["node3"]["msg"]
        assert "no common version" not in tasks["node3"]["msg"]
    assert doc["failed_hosts"] == NODES


def test_a_host_without_dtake_has_nothing_to_break(tmp_path: Path) -> None:
    """Not installed ("command not found"): no old build to replicate with."""
    o = _opts(tmp_path)
    remotes = {n: running_host(n, (2, 2)) for n in NODES[:2]}
    remotes["node3"] = fresh_host("node3")
    _pacemaker(remotes["node1"], before="node2", after="node1")
    res = upgrade(NODES, scripted_connector(remotes), o, sync_timeout=5)
    assert res.exit_code == EXIT_OK and not res.findings, res.render()
    t = next(t for t in res.hosts[2].tasks if t.name == "protocol")
    assert "not installed" in t.msg


def test_allow_protocol_break_rolls_with_a_warning(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    remotes = {n: running_host(n, None) for n in NODES}
    _pacemaker(remotes["node1"], before="node2", after="node1")
    res = upgrade(NODES, scripted_connector(remotes), o, sync_timeout=5, allow_protocol_break=True)
    assert res.exit_code == EXIT_OK, res.render()
    (f,) = res.findings
    assert (f.code, f.severity) == ("PROTOCOL_BREAK", "warning")
    assert "between the old build on node1, node2, node3 and the upgraded nodes" in f.message
    assert res.render().startswith("WARNING PROTOCOL_BREAK ")
    assert all(len(r.ran(r"dtsetup apply (?!.*--check)")) == 1 for r in remotes.values())


def test_cli_upgrade_takes_allow_protocol_break() -> None:
    base = ["upgrade", "--hosts", "a", "--ini", "x.ini"]
    assert not _parser().parse_args(base).allow_protocol_break
    assert _parser().parse_args([*base, "--allow-protocol-break"]).allow_protocol_break

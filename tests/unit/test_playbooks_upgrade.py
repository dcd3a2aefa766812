"""The rolling upgrade [L503-507] on scripted hosts: plan, order, resync gate, stuck move."""

from __future__ import annotations

import json
import re
from pathlib import Path

from playbooks.deploy import DeployOptions
from playbooks.pacemaker import parse_crm_mon
from playbooks.recap import EXIT_FAILED, EXIT_OK
from playbooks.testing import ScriptedRemote, converged_host, fresh_host, scripted_connector
from playbooks.upgrade import OK_TEXT, in_sync, upgrade

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


def _opts(tmp: Path) -> DeployOptions:
    house = tmp / "wh"
    house.mkdir()
    (house / "dtake-0.2.0-py3-none-any.whl").write_bytes(b"new wheel")
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
    """E.g. a new version the old one cannot replicate to: the resources stay on the held
    node, and the failure says why (the source's replication errors)."""
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
    remotes["node2"].script(r"dtake --json status$", stdout=json.dumps(status))
    res = upgrade(NODES, scripted_connector(remotes), o, sync_timeout=0)
    assert res.exit_code == EXIT_FAILED, res.render()
    text = res.render()
    assert "stopped before the move, resources stay on node2" in text
    assert "Target node1 is pending" in text and err in text
    assert not ctl.ran("--node node2 --name standby --update on")
    assert not remotes["node2"].ran(r"dtsetup apply (?!.*--check)")
    assert ctl.ran("--node node3 --name standby --update off")  # upgraded ones are back

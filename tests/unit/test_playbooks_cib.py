"""CIB rendering and diff (playbooks.cib) and the resources playbook on scripted hosts."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from playbooks import cib
from playbooks.recap import CHANGED, FAILED, OK
from playbooks.resources import ResourcesOptions, resources
from playbooks.spec import ClusterSpec, SpecError, parse_spec
from playbooks.testing import ScriptedRemote, scripted_connector

SPEC = """\
version: 1
cluster:
  name: c1
  nodes:
    - {name: node1, addrs: [10.0.0.1]}
    - {name: node2, addrs: [10.0.0.2]}
    - {name: node3, addrs: [10.0.0.3]}
  properties: {stonith-enabled: false}
resources:
  - id: data
    type: ReplicatedDisk
    directory: /srv/data
    owners: [node1, node2]
    params: {sourcefailoverdelay: 10}
  - id: ip
    agent: ocf:heartbeat:IPaddr2
    params: {ip: 10.0.0.100, cidr_netmask: 24}
  - id: app
    agent: ocf:heartbeat:Dummy
groups:
  - id: g
    resources: [ip, app]
constraints:
  colocation:
    - {rsc: g, with: data, with_role: Promoted}
  order:
    - {first: data, first_action: promote, then: g, then_action: start}
"""

EMPTY_CIB = """<cib epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config><cluster_property_set id="cib-bootstrap-options">
      <nvpair id="o1" name="stonith-enabled" value="false"/>
    </cluster_property_set></crm_config>
    <nodes/>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>"""


def spec(text: str = SPEC) -> ClusterSpec:
    return parse_spec(text, source="c.yaml")


def converged(s: ClusterSpec, live: str = EMPTY_CIB) -> str:
    r, c = cib.desired_resources(s), cib.desired_constraints(s)
    return cib.apply_changes(live, cib.diff_cib(live, r, c, prune=s.prune), r, c)


def test_replicated_disk_renders_a_promotable_clone_over_its_owners() -> None:
    s = spec()
    res = cib.desired_resources(s)
    assert list(res) == ["data-clone", "g"]
    clone = res["data-clone"]
    meta = {nv.get("name"): nv.get("value") for nv in clone.iter("nvpair")}
    assert meta["promotable"] == "true" and meta["clone-max"] == "2"
    prim = clone.find("primitive")
    assert prim is not None and prim.get("type") == "ReplicatedDisk"
    assert prim.get("provider") == "dtake"
    ops = {(o.get("name"), o.get("role")) for o in clone.iter("op")}
    assert ("monitor", "Promoted") in ops and ("monitor", "Unpromoted") in ops
    cons = cib.desired_constraints(s)
    # node3 is not an owner: the clone is kept off it
    ban = cons["location-data-clone-node3--INFINITY"]
    assert ban.get("score") == "-INFINITY" and ban.get("rsc") == "data-clone"
    col = next(e for e in cons.values() if e.tag == "rsc_colocation")
    assert col.get("with-rsc") == "data-clone" and col.get("with-rsc-role") == "Promoted"


def test_everything_is_created_on_an_empty_cib_then_nothing_is_left_to_do() -> None:
    s = spec()
    r, c = cib.desired_resources(s), cib.desired_constraints(s)
    first = cib.diff_cib(EMPTY_CIB, r, c, prune=False)
    assert {(ch.action, ch.id) for ch in first} == {
        ("create", "data-clone"),
        ("create", "g"),
        ("create", "location-data-clone-node3--INFINITY"),
        ("create", "colocation-g-data-clone-INFINITY"),
        ("create", "order-data-clone-g-Mandatory"),
    }
    new = cib.apply_changes(EMPTY_CIB, first, r, c)
    assert cib.diff_cib(new, r, c, prune=False) == []


def test_whitespace_and_attribute_order_are_not_differences() -> None:
    s = spec()
    live = converged(s)
    root = ET.fromstring(live)
    for e in root.iter():  # pretty-print and reverse the attribute order, as a CIB may come back
        items = list(e.attrib.items())[::-1]
        e.attrib.clear()
        e.attrib.update(items)
        e.text = "\n  "
    pretty = ET.tostring(root, encoding="unicode")
    assert (
        cib.diff_cib(pretty, cib.desired_resources(s), cib.desired_constraints(s), prune=False)
        == []
    )


def test_a_changed_parameter_is_one_update_of_that_element_only() -> None:
    live = converged(spec())
    s2 = spec(SPEC.replace("10.0.0.100", "10.0.0.101"))
    changes = cib.diff_cib(
        live, cib.desired_resources(s2), cib.desired_constraints(s2), prune=False
    )
    assert [(ch.action, ch.section, ch.id) for ch in changes] == [("update", "resources", "g")]
    assert "10.0.0.100" in changes[0].before and "10.0.0.101" in changes[0].after


def test_unmanaged_elements_are_kept_unless_prune_and_cli_constraints_always_kept() -> None:
    live = converged(spec())
    root = ET.fromstring(live)
    res = root.find("configuration/resources")
    cons = root.find("configuration/constraints")
    assert res is not None and cons is not None
    ET.SubElement(
        res, "primitive", {"id": "other", "class": "ocf", "provider": "heartbeat", "type": "Dummy"}
    )
    ET.SubElement(
        cons,
        "rsc_location",
        {"id": "cli-ban-g-on-node1", "rsc": "g", "node": "node1", "score": "-INFINITY"},
    )
    ET.SubElement(
        cons, "rsc_location", {"id": "mine", "rsc": "other", "node": "node1", "score": "5"}
    )
    live2 = ET.tostring(root, encoding="unicode")
    s = spec()
    r, c = cib.desired_resources(s), cib.desired_constraints(s)
    assert cib.diff_cib(live2, r, c, prune=False) == []
    pruned = cib.diff_cib(live2, r, c, prune=True)
    assert {(ch.action, ch.id) for ch in pruned} == {("delete", "other"), ("delete", "mine")}


def test_a_primitive_moved_into_a_group_is_deleted_at_top_level() -> None:
    s1 = spec(
        SPEC.replace("groups:\n  - id: g\n    resources: [ip, app]\n", "")
        .replace("rsc: g,", "rsc: app,")
        .replace("then: g,", "then: app,")
    )
    live = converged(s1)
    s2 = spec()
    changes = cib.diff_cib(
        live, cib.desired_resources(s2), cib.desired_constraints(s2), prune=False
    )
    acts = {(ch.action, ch.id) for ch in changes if ch.section == "resources"}
    assert acts == {("create", "g"), ("delete", "ip"), ("delete", "app")}
    new = cib.apply_changes(live, changes, cib.desired_resources(s2), cib.desired_constraints(s2))
    ids = [e.get("id") for e in ET.fromstring(new).iter("primitive")]
    assert sorted(ids) == ["app", "data", "ip"]  # each id exactly once


# ---------------------------------------------------------------------------- the playbook
def scripted(live: str, *, verify_rc: int = 0) -> ScriptedRemote:
    r = ScriptedRemote("node1")
    r.script(r"^cibadmin --query$", stdout=live)
    r.script(r"^mktemp -d", stdout="/tmp/dtake-cib.x\n")
    r.script(r"^crm_verify", rc=verify_rc, stderr="error: bad" if verify_rc else "")
    r.script(r"^crm_diff", rc=1)
    r.script(r"^cibadmin --patch")
    r.script(r"^rm -rf")
    return r


def test_resources_pushes_one_patch_then_reports_no_change() -> None:
    s = spec()
    node1 = scripted(EMPTY_CIB)
    res = resources(s, scripted_connector({"node1": node1}), ResourcesOptions())
    assert res.exit_code == 0 and res.changed
    assert len(node1.ran(r"^cibadmin --patch")) == 1
    new = node1.files["/tmp/dtake-cib.x/new.xml"].decode()
    assert node1.files["/tmp/dtake-cib.x/live.xml"].decode() == EMPTY_CIB
    assert not node1.unexpected
    # second run against the converged CIB: every element ok, nothing pushed
    again = scripted(new)
    res2 = resources(s, scripted_connector({"node1": again}), ResourcesOptions())
    assert not res2.changed and res2.exit_code == 0
    assert {t.status for t in res2.hosts[0].tasks} == {OK}
    assert again.ran(r"cibadmin --patch|crm_diff|mktemp") == []


def test_check_mode_reports_but_never_writes() -> None:
    node1 = scripted(EMPTY_CIB)
    res = resources(
        spec(), scripted_connector({"node1": node1}), ResourcesOptions(check=True, diff=True)
    )
    assert res.changed
    assert all(t.msg.startswith("would ") for t in res.hosts[0].tasks if t.status == CHANGED)
    assert any("+ <clone" in t.diff for t in res.hosts[0].tasks)
    assert node1.calls == ["cibadmin --query"]


def test_a_cib_that_fails_crm_verify_is_not_pushed() -> None:
    node1 = scripted(EMPTY_CIB, verify_rc=1)
    res = resources(spec(), scripted_connector({"node1": node1}), ResourcesOptions())
    assert res.exit_code == 2
    assert any(t.name == "cib verify" and t.status == FAILED for t in res.hosts[0].tasks)
    assert node1.ran(r"cibadmin --patch") == []
    assert node1.ran(r"^rm -rf")  # the temp dir is cleaned up on failure too


def test_first_node_unreachable_the_next_one_does_the_work() -> None:
    node2 = scripted(EMPTY_CIB)
    node2.host = "node2"
    res = resources(spec(), scripted_connector({"node2": node2}), ResourcesOptions())
    assert [h.host for h in res.hosts] == ["node1", "node2"]
    assert res.hosts[0].unreachable and not res.hosts[1].failed
    assert node2.ran(r"cibadmin --patch")


# ---------------------------------------------------------------------------- spec errors
def _codes(text: str) -> list[tuple[str, str, int | None]]:
    with pytest.raises(SpecError) as ei:
        parse_spec(text, source="bad.yaml")
    return [(f.code, f.path, f.line) for f in ei.value.findings]


def test_schema_errors_name_path_and_line_all_at_once() -> None:
    bad = SPEC.replace("owners: [node1, node2]", "owners: [node1]").replace(
        "agent: ocf:heartbeat:Dummy", "agent: heartbeat-Dummy"
    )
    found = _codes(bad)
    assert ("SPEC_SCHEMA", "$.resources[0].owners", 13) in found
    assert ("SPEC_SCHEMA", "$.resources[2].agent", 19) in found


def test_references_are_checked_with_their_location() -> None:
    bad = SPEC.replace("owners: [node1, node2]", "owners: [node1, node9]").replace(
        "resources: [ip, app]", "resources: [ip, nope]"
    )
    found = _codes(bad)
    assert ("SPEC_UNKNOWN_NODE", "$.resources[0].owners[1]", 13) in found
    assert ("SPEC_UNKNOWN_RESOURCE", "$.groups[0].resources[1]", 22) in found


def test_yaml_syntax_error_has_a_line() -> None:
    found = _codes("version: 1\ncluster: [\n")
    assert found[0][0] == "SPEC_YAML_SYNTAX" and found[0][2] is not None


def test_unknown_key_is_rejected_not_ignored() -> None:
    found = _codes(
        SPEC.replace("    directory: /srv/data", "    directory: /srv/data\n    owner: node1")
    )
    assert found[0][0] == "SPEC_SCHEMA" and found[0][1] == "$.resources[0]"


def test_schema_and_reference_errors_are_reported_together() -> None:
    bad = SPEC.replace("owners: [node1, node2]", "owners: [node1, node9]").replace(
        "agent: ocf:heartbeat:Dummy", "agent: heartbeat-Dummy"
    )
    found = _codes(bad)
    assert ("SPEC_SCHEMA", "$.resources[2].agent", 19) in found
    assert ("SPEC_UNKNOWN_NODE", "$.resources[0].owners[1]", 13) in found


def test_reference_checks_on_a_shape_the_schema_rejected_do_not_crash() -> None:
    found = _codes("version: 1\ncluster: {name: x, nodes: 3}\nresources: [{id: 1}]\n")
    assert found and {c for c, _, _ in found} == {"SPEC_SCHEMA"}

"""Cluster checks (``--dtake-cluster``): membership, quorum and the roles of the dtake
resources, from ``crm_mon --output-as xml`` on each host (never the text output), run
once per host and parsed once for the whole module."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

OK_TEXT = "The status of all targets is OK."


@pytest.fixture(scope="module")
def crm(host: Any, dtake_target: Any) -> ET.Element:
    if not dtake_target.cluster:
        pytest.skip("cluster checks not requested (--dtake-cluster)")
    return ET.fromstring(host.check_output("crm_mon --output-as xml --inactive -A"))


def test_membership(host: Any, dtake_target: Any, crm: ET.Element) -> None:
    online = {n.get("name") for n in crm.iter("node") if n.get("online") == "true"}
    expected = set(dtake_target.nodes) or {host.check_output("crm_node -n").strip()}
    assert expected <= online, f"offline: {sorted(expected - online)}"


def test_quorum(crm: ET.Element) -> None:
    dc = crm.find("summary/current_dc")
    assert dc is not None and dc.get("present") == "true", "no DC"
    assert dc.get("with_quorum") == "true", "partition without quorum"


def _dtake_instances(crm: ET.Element) -> dict[str, list[ET.Element]]:
    out: dict[str, list[ET.Element]] = {}
    for r in crm.iter("resource"):
        if ":dtake:" in (r.get("resource_agent") or ""):
            out.setdefault((r.get("id") or "").split(":")[0], []).append(r)
    return out


def test_dtake_resources_not_failed(crm: ET.Element) -> None:
    failed = [
        r.get("id")
        for rs in _dtake_instances(crm).values()
        for r in rs
        if r.get("failed") == "true"
    ]
    assert not failed, f"failed: {failed}"


def test_replicated_disk_has_one_promoted_copy(crm: ET.Element) -> None:
    for rid, instances in _dtake_instances(crm).items():
        if "ReplicatedDisk" not in (instances[0].get("resource_agent") or ""):
            continue
        promoted = [
            n.get("name")
            for r in instances
            if r.get("role") in ("Promoted", "Master")
            for n in r.iter("node")
        ]
        assert len(promoted) == 1, f"{rid}: promoted on {promoted or 'no node (online pending?)'}"


def test_replicated_disk_targets_ok(crm: ET.Element) -> None:
    texts = {
        (n.get("name"), a.get("name")): a.get("value")
        for n in crm.iter("node")
        for a in n.iter("attribute")
        if (a.get("name") or "").startswith("dtake-") and (a.get("name") or "").endswith("-status")
    }
    bad = {k: v for k, v in texts.items() if v != OK_TEXT}
    assert not bad, f"not OK: {bad}"

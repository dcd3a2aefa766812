"""Pacemaker status from ``crm_mon --output-as xml`` (XML, never the text output)."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from playbooks.remote import HostTimeout, Remote

__all__ = ["CRM_MON", "CRM_MON_ATTRS", "Status", "parse_crm_mon", "status", "wait_for_cluster"]

CRM_MON = "crm_mon --output-as xml --inactive"
CRM_MON_ATTRS = CRM_MON + " -A"  # plus node attributes (promotion scores, dtake status)


@dataclass
class Status:
    dc: str = ""
    quorate: bool = False
    online: list[str] = field(default_factory=list)
    offline: list[str] = field(default_factory=list)
    # resource id (clone instance suffix removed) -> {node: role}
    roles: dict[str, dict[str, str]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    standby: list[str] = field(default_factory=list)
    # resource id -> agent (ocf:dtake:ReplicatedDisk...); ids of promotable clones' members
    agents: dict[str, str] = field(default_factory=dict)
    promotable: set[str] = field(default_factory=set)
    # node -> {attribute: value} (only with CRM_MON_ATTRS)
    attrs: dict[str, dict[str, str]] = field(default_factory=dict)

    def promoted(self, rsc: str) -> list[str]:
        return sorted(n for n, r in self.roles.get(rsc, {}).items() if r in ("Promoted", "Master"))

    def running_on(self, rsc: str) -> list[str]:
        return sorted(self.roles.get(rsc, {}))


def parse_crm_mon(xml: str) -> Status:
    root = ET.fromstring(xml)
    st = Status()
    dc = root.find("summary/current_dc")
    if dc is not None:
        st.dc = dc.get("name", "")
        st.quorate = dc.get("with_quorum") == "true"
    for n in root.findall("nodes/node"):
        (st.online if n.get("online") == "true" else st.offline).append(n.get("name", ""))
        if n.get("standby") == "true":
            st.standby.append(n.get("name", ""))
    for clone in root.iter("clone"):
        if clone.get("multi_state") == "true":
            st.promotable.update(r.get("id", "").split(":")[0] for r in clone.iter("resource"))
    for n in root.findall("node_attributes/node"):
        st.attrs[n.get("name", "")] = {
            a.get("name", ""): a.get("value", "") for a in n.findall("attribute")
        }
    for r in root.iter("resource"):
        rid = r.get("id", "").split(":")[0]
        st.agents.setdefault(rid, r.get("resource_agent", ""))
        if r.get("failed") == "true":
            st.failed.append(rid)
        if r.get("active") != "true":
            continue
        for node in r.findall("node"):
            st.roles.setdefault(rid, {})[node.get("name", "")] = r.get("role", "")
    return st


def status(remote: Remote, *, attrs: bool = False) -> Status:
    cmd = CRM_MON_ATTRS if attrs else CRM_MON
    return parse_crm_mon(remote.run(cmd, timeout=30, check=True).stdout)


def wait_for_cluster(remote: Remote, nodes: list[str], *, timeout: float = 120.0) -> Status:
    """Quorate, with a DC, every node of ``nodes`` online, as ``remote`` sees it."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        r = remote.run(CRM_MON, timeout=30)
        if r.ok:
            st = parse_crm_mon(r.stdout)
            missing = [n for n in nodes if n not in st.online]
            if st.dc and st.quorate and not missing:
                return st
            last = f"dc={st.dc or '-'} quorate={st.quorate} offline={missing}"
        time.sleep(1.0)
    raise HostTimeout(f"cluster not formed within {timeout:.0f}s ({last})")

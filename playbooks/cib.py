"""CIB domain: render the spec's resources and constraints, diff them with the live CIB.

The ha_cluster way (anchors-iac-style §1.2): the whole desired state is rendered, compared
with the live one element by element, and only the differences are pushed, as one
``crm_diff`` patch applied by ``cibadmin --patch`` on one node. A second run finds no
difference and pushes nothing. Pure functions: no subprocess here.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Literal

from playbooks.spec import ClusterSpec, _str

__all__ = [
    "CREATE",
    "DELETE",
    "UPDATE",
    "CibChange",
    "apply_changes",
    "canonical",
    "desired_constraints",
    "desired_resources",
    "diff_cib",
    "live_properties",
]

CREATE, UPDATE, DELETE = "create", "update", "delete"
Section = Literal["resources", "constraints"]


@dataclass(frozen=True)
class CibChange:
    action: str  # create | update | delete
    section: Section
    id: str
    before: str  # canonical XML ("" for create)
    after: str  # canonical XML ("" for delete)

    def render(self) -> str:
        return f"{self.action} {self.section[:-1]} {self.id}"


# ---------------------------------------------------------------------------- rendering
def _nvset(parent: ET.Element, tag: str, owner: str, attrs: dict[str, Any]) -> None:
    if not attrs:
        return
    s = ET.SubElement(parent, tag, {"id": f"{owner}-{tag}"})
    for name in sorted(attrs):
        ET.SubElement(
            s, "nvpair", {"id": f"{owner}-{tag}-{name}", "name": name, "value": _str(attrs[name])}
        )


def _ops(parent: ET.Element, owner: str, ops: list[dict[str, Any]]) -> None:
    if not ops:
        return
    el = ET.SubElement(parent, "operations")
    for op in ops:
        interval = op.get("interval", "0s")
        oid = f"{owner}-{op['name']}-interval-{interval}"
        if op.get("role"):
            oid += f"-{op['role']}"
        attrs = {"id": oid, "name": op["name"], "interval": interval}
        for key in ("timeout", "role", "on-fail"):
            if key in op:
                attrs[key] = str(op[key])
        ET.SubElement(el, "op", attrs)


def _primitive(rid: str, agent: str, r: dict[str, Any], params: dict[str, Any]) -> ET.Element:
    parts = agent.split(":")
    attrs = {"id": rid, "class": parts[0], "type": parts[-1]}
    if parts[0] == "ocf":
        attrs["provider"] = parts[1]
    el = ET.Element("primitive", attrs)
    _nvset(el, "instance_attributes", rid, params)
    _nvset(el, "meta_attributes", rid, r.get("meta", {}))
    _ops(el, rid, r.get("ops", []))
    return el


RD_OPS = [
    {"name": "monitor", "interval": "10s", "timeout": "30s", "role": "Promoted"},
    {"name": "monitor", "interval": "11s", "timeout": "30s", "role": "Unpromoted"},
    {"name": "start", "interval": "0s", "timeout": "60s"},
    {"name": "stop", "interval": "0s", "timeout": "120s"},
    {"name": "promote", "interval": "0s", "timeout": "120s"},
    {"name": "demote", "interval": "0s", "timeout": "120s"},
]
SC_OPS = [{"name": "monitor", "interval": "10s", "timeout": "30s"}]


def _resource(r: dict[str, Any]) -> tuple[ET.Element, str | None]:
    """(element, clone id or None) for one spec resource, before grouping."""
    kind = r.get("type", "primitive")
    rid = r["id"]
    if kind == "ReplicatedDisk":
        params: dict[str, Any] = {"directory": r["directory"]}
        if r.get("addresses"):
            params["addresses"] = " ".join(f"{n}={a}" for n, a in sorted(r["addresses"].items()))
        params.update(r.get("params", {}))
        prim = _primitive(
            rid, "ocf:dtake:ReplicatedDisk", {**r, "ops": r.get("ops", RD_OPS)}, params
        )
        cid = f"{rid}-clone"
        meta = {
            "promotable": "true",
            "promoted-max": "1",
            "promoted-node-max": "1",
            "clone-max": str(len(r["owners"])),
            "clone-node-max": "1",
        }
        meta.update({k: _str(v) for k, v in r.get("clone_meta", {}).items()})
        clone = ET.Element("clone", {"id": cid})
        _nvset(clone, "meta_attributes", cid, meta)
        clone.append(prim)
        return clone, cid
    if kind == "SourceConnection":
        params = {"repset": r.get("repset", rid), "rules": r["rules"], "target": r["target"]}
        if "target_path" in r:
            params["target_path"] = r["target_path"]
        params.update(r.get("params", {}))
        return _primitive(
            rid, "ocf:dtake:SourceConnection", {**r, "ops": r.get("ops", SC_OPS)}, params
        ), None
    prim = _primitive(rid, r["agent"], r, r.get("params", {}))
    if "clone" in r:
        c = r["clone"]
        cid = c.get("id", f"{rid}-clone")
        clone = ET.Element("clone", {"id": cid})
        meta = dict(c.get("meta", {}))
        if c.get("promotable"):
            meta["promotable"] = "true"
        _nvset(clone, "meta_attributes", cid, meta)
        clone.append(prim)
        return clone, cid
    return prim, None


def desired_resources(spec: ClusterSpec) -> dict[str, ET.Element]:
    """Top-level elements of <resources> by id, in spec order (groups where they are)."""
    built = {r["id"]: _resource(r) for r in spec.resources}
    members = {m: g for g in spec.groups for m in g["resources"]}
    out: dict[str, ET.Element] = {}
    for r in spec.resources:
        rid = r["id"]
        if rid in members:
            g = members[rid]
            if g["id"] in out:
                continue
            grp = ET.Element("group", {"id": g["id"]})
            _nvset(grp, "meta_attributes", g["id"], g.get("meta", {}))
            for m in g["resources"]:
                grp.append(built[m][0])
            out[g["id"]] = grp
        else:
            el, _ = built[rid]
            out[el.get("id", rid)] = el
    return out


def _top(spec: ClusterSpec, rid: str) -> str:
    """Constraints on a ReplicatedDisk name its clone (the thing that has roles)."""
    for r in spec.resources:
        if r["id"] == rid and (r.get("type") == "ReplicatedDisk"):
            return f"{rid}-clone"
    return rid


def desired_constraints(spec: ClusterSpec) -> dict[str, ET.Element]:
    out: dict[str, ET.Element] = {}
    # ReplicatedDisk runs only on its owners (when the cluster has other nodes)
    for r in spec.resources:
        if r.get("type") == "ReplicatedDisk":
            for node in spec.node_names:
                if node not in r["owners"]:
                    cid = f"location-{r['id']}-clone-{node}--INFINITY"
                    out[cid] = ET.Element(
                        "rsc_location",
                        {"id": cid, "rsc": f"{r['id']}-clone", "node": node, "score": "-INFINITY"},
                    )
    cons = spec.constraints
    for c in cons.get("location", []):
        rsc, score = _top(spec, c["rsc"]), str(c["score"])
        cid = c.get("id", f"location-{rsc}-{c['node']}-{score}")
        attrs = {"id": cid, "rsc": rsc, "node": c["node"], "score": score}
        if "role" in c:
            attrs["role"] = c["role"]
        out[cid] = ET.Element("rsc_location", attrs)
    for c in cons.get("colocation", []):
        rsc, with_ = _top(spec, c["rsc"]), _top(spec, c["with"])
        score = str(c.get("score", "INFINITY"))
        cid = c.get("id", f"colocation-{rsc}-{with_}-{score}")
        attrs = {"id": cid, "rsc": rsc, "with-rsc": with_, "score": score}
        if "rsc_role" in c:
            attrs["rsc-role"] = c["rsc_role"]
        if "with_role" in c:
            attrs["with-rsc-role"] = c["with_role"]
        out[cid] = ET.Element("rsc_colocation", attrs)
    for c in cons.get("order", []):
        first, then = _top(spec, c["first"]), _top(spec, c["then"])
        cid = c.get("id", f"order-{first}-{then}-{c.get('kind', 'Mandatory')}")
        attrs = {"id": cid, "first": first, "then": then, "kind": c.get("kind", "Mandatory")}
        if "first_action" in c:
            attrs["first-action"] = c["first_action"]
        if "then_action" in c:
            attrs["then-action"] = c["then_action"]
        out[cid] = ET.Element("rsc_order", attrs)
    return out


# ---------------------------------------------------------------------------- comparing
def canonical(el: ET.Element) -> str:
    """Order-insensitive for attributes, order-sensitive for children, no whitespace."""
    clean = copy.deepcopy(el)
    for e in clean.iter():
        e.text = None
        e.tail = None
        attrs = sorted(e.attrib.items())
        e.attrib.clear()
        e.attrib.update(attrs)
    return ET.tostring(clean, encoding="unicode")


def _section(cib: ET.Element, name: str) -> ET.Element:
    sec = cib.find(f"configuration/{name}")
    if sec is None:
        raise ValueError(f"CIB has no configuration/{name}")
    return sec


def _ids(el: ET.Element) -> set[str]:
    return {e.get("id", "") for e in el.iter() if e.tag in ("primitive", "group", "clone")}


def diff_cib(
    live_xml: str,
    resources: dict[str, ET.Element],
    constraints: dict[str, ET.Element],
    *,
    prune: bool,
) -> list[CibChange]:
    """The changes that turn the live CIB into the desired one (empty: nothing to do)."""
    cib = ET.fromstring(live_xml)
    changes: list[CibChange] = []
    for name, desired in (("resources", resources), ("constraints", constraints)):
        sec = _section(cib, name)
        live = {e.get("id", ""): e for e in sec}
        wanted_inner: set[str] = set()
        for el in desired.values():
            wanted_inner |= _ids(el)
        for did, el in desired.items():
            after = canonical(el)
            if did not in live:
                changes.append(CibChange(CREATE, name, did, "", after))  # type: ignore[arg-type]
            else:
                before = canonical(live[did])
                if before != after:
                    changes.append(CibChange(UPDATE, name, did, before, after))  # type: ignore[arg-type]
        for lid, el in live.items():
            if lid in desired:
                continue
            moved = name == "resources" and lid in wanted_inner  # e.g. now inside a group
            managed_cli = lid.startswith(("cli-prefer-", "cli-ban-"))
            if moved or (prune and not managed_cli):
                changes.append(CibChange(DELETE, name, lid, canonical(el), ""))  # type: ignore[arg-type]
    return changes


def apply_changes(
    live_xml: str,
    changes: list[CibChange],
    resources: dict[str, ET.Element],
    constraints: dict[str, ET.Element],
) -> str:
    """The live CIB with the changes made: the `new` side of `crm_diff`."""
    cib = ET.fromstring(live_xml)
    for ch in changes:
        sec = _section(cib, ch.section)
        desired = resources if ch.section == "resources" else constraints
        existing = next((e for e in sec if e.get("id") == ch.id), None)
        if ch.action == DELETE:
            if existing is not None:
                sec.remove(existing)
        elif ch.action == UPDATE and existing is not None:
            idx = list(sec).index(existing)
            sec.remove(existing)
            sec.insert(idx, copy.deepcopy(desired[ch.id]))
        else:
            sec.append(copy.deepcopy(desired[ch.id]))
    return ET.tostring(cib, encoding="unicode")


def live_properties(live_xml: str) -> dict[str, str]:
    """Cluster properties (cib-bootstrap-options) of a CIB."""
    cib = ET.fromstring(live_xml)
    out: dict[str, str] = {}
    for nv in cib.findall("configuration/crm_config/cluster_property_set/nvpair"):
        out[nv.get("name", "")] = nv.get("value", "")
    return out

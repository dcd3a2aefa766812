"""The cluster spec (YAML): load with line numbers, validate, model.

Every problem is reported at once with its file, JSON path and line (cloud-init's
``schema --annotate`` UX), first by ``schemas/cluster.schema.json``, then by the checks a
schema cannot express (references between resources, owners that are not nodes, duplicate
ids). A spec with any error is never applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from playbooks.reports import Finding

__all__ = [
    "SCHEMA_PATH",
    "ClusterSpec",
    "Node",
    "SpecError",
    "load_spec",
    "parse_spec",
]


def _schema_path() -> Path:
    """schemas/ of the checkout, else the copy the dtake package ships (installed wheel)."""
    repo = Path(__file__).resolve().parents[1] / "schemas" / "cluster.schema.json"
    if repo.is_file():
        return repo
    import dtake

    return Path(dtake.__file__).resolve().parent / "schemas" / "cluster.schema.json"


SCHEMA_PATH = _schema_path()


class SpecError(Exception):
    """The spec is invalid; ``findings`` lists every problem."""

    def __init__(self, findings: list[Finding]) -> None:
        super().__init__("\n".join(f.render() for f in findings))
        self.findings = findings


@dataclass(frozen=True)
class Node:
    name: str
    addrs: tuple[str, ...]
    nodeid: int


@dataclass
class ClusterSpec:
    name: str
    nodes: list[Node]
    transport: str = "knet"
    token_ms: int | None = None
    crypto: bool | None = None
    quorum_policy: str | None = None
    two_node: bool | None = None
    wait_for_all: bool | None = None
    properties: dict[str, str] = field(default_factory=dict)
    resources: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    constraints: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    prune: bool = False
    raw: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]


# ---------------------------------------------------------------------------- line map
def _line_map(node: yaml.Node, path: str, out: dict[str, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = str(k.value)
            child = f"{path}.{key}"
            out[child] = k.start_mark.line + 1
            _line_map(v, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, f"{path}[{i}]", out)


def _json_path(parts: list[str | int] | Any) -> str:
    p = "$"
    for part in parts:
        p += f"[{part}]" if isinstance(part, int) else f".{part}"
    return p


def _line_for(path: str, lines: dict[str, int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            break
        path = path[:cut]
    return lines.get("$")


@cache
def _schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return data


# ---------------------------------------------------------------------------- loading
def load_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a spec file; SpecError with every finding."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([Finding("SPEC_UNREADABLE", str(e), file=str(p))]) from e
    return parse_spec(text, source=str(p))


def parse_spec(text: str, *, source: str = "<spec>") -> ClusterSpec:
    from jsonschema import Draft202012Validator

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise SpecError(
            [Finding("SPEC_YAML_SYNTAX", str(e).replace("\n", " "), file=source, line=line)]
        ) from e
    lines: dict[str, int] = {}
    if root is not None:
        _line_map(root, "$", lines)
    if not isinstance(data, dict):
        raise SpecError([Finding("SPEC_SHAPE", "the spec must be a mapping", file=source, line=1)])

    findings: list[Finding] = []
    validator = Draft202012Validator(_schema())
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        jp = _json_path(list(err.absolute_path))
        findings.append(
            Finding("SPEC_SCHEMA", err.message, file=source, path=jp, line=_line_for(jp, lines))
        )
    # The checks a schema cannot express run even when the schema found problems, so that
    # every problem is reported at once; on data the schema rejected they may trip over a
    # missing key or a wrong type: what they found until then is kept.
    schema_failed = bool(findings)

    def at(code: str, jp: str, msg: str) -> None:
        findings.append(Finding(code, msg, file=source, path=jp, line=_line_for(jp, lines)))

    try:
        c = data["cluster"]
        nodes: list[Node] = []
        seen_nodeids: set[int] = set()
        for i, n in enumerate(c["nodes"]):
            nodeid = int(n.get("nodeid", i + 1))
            if nodeid in seen_nodeids:
                at("SPEC_DUPLICATE", f"$.cluster.nodes[{i}].nodeid", f"nodeid {nodeid} used twice")
            seen_nodeids.add(nodeid)
            nodes.append(Node(n["name"], tuple(n["addrs"]), nodeid))
        names = [n.name for n in nodes]
        for i, name in enumerate(names):
            if name in names[:i]:
                at("SPEC_DUPLICATE", f"$.cluster.nodes[{i}].name", f"node {name!r} listed twice")
        naddrs = {len(n.addrs) for n in nodes}
        if len(naddrs) > 1:
            at("SPEC_LINKS", "$.cluster.nodes", "every node needs the same number of addrs (links)")
        quorum = c.get("quorum", {})
        if quorum.get("two_node") and len(nodes) != 2:
            at("SPEC_QUORUM", "$.cluster.quorum.two_node", "two_node needs exactly two nodes")

        # ids: every id in the CIB must be unique, including the clones the shorthands create
        ids: dict[str, str] = {}

        def claim(rid: str, jp: str) -> None:
            if rid in ids:
                at("SPEC_DUPLICATE", jp, f"id {rid!r} is already used at {ids[rid]}")
            else:
                ids[rid] = jp

        resources = list(data.get("resources", []))
        primitives: set[str] = set()
        cloned: set[str] = set()
        for i, r in enumerate(resources):
            jp = f"$.resources[{i}]"
            claim(r["id"], f"{jp}.id")
            primitives.add(r["id"])
            kind = r.get("type", "primitive")
            if kind == "ReplicatedDisk":
                claim(f"{r['id']}-clone", f"{jp}.id")
                cloned.add(r["id"])
                for j, owner in enumerate(r["owners"]):
                    if owner not in names:
                        at(
                            "SPEC_UNKNOWN_NODE",
                            f"{jp}.owners[{j}]",
                            f"owner {owner!r} is not a cluster node ({', '.join(names)})",
                        )
                for owner in r.get("addresses", {}):
                    if owner not in r["owners"]:
                        at(
                            "SPEC_UNKNOWN_NODE",
                            f"{jp}.addresses.{owner}",
                            f"{owner!r} is not an owner",
                        )
            elif "clone" in r:
                claim(r["clone"].get("id", f"{r['id']}-clone"), f"{jp}.clone")
                cloned.add(r["id"])
        in_group: dict[str, str] = {}
        groups = list(data.get("groups", []))
        for i, g in enumerate(groups):
            jp = f"$.groups[{i}]"
            claim(g["id"], f"{jp}.id")
            for j, member in enumerate(g["resources"]):
                mp = f"{jp}.resources[{j}]"
                if member not in primitives:
                    at("SPEC_UNKNOWN_RESOURCE", mp, f"{member!r} is not a resource of this spec")
                elif member in cloned:
                    at("SPEC_GROUP_MEMBER", mp, f"{member!r} is a clone; a group holds primitives")
                elif member in in_group:
                    at(
                        "SPEC_GROUP_MEMBER",
                        mp,
                        f"{member!r} is already in group {in_group[member]!r}",
                    )
                else:
                    in_group[member] = g["id"]
        top_level = (
            {gid for gid in (g["id"] for g in groups)}
            | {f"{r}-clone" for r in cloned}
            | {r["clone"]["id"] for r in resources if "clone" in r and "id" in r["clone"]}
            | {p for p in primitives if p not in cloned and p not in in_group}
            | set(primitives)  # a constraint may name a primitive inside a group or clone
        )
        cons = data.get("constraints", {})
        for kind, keys in (
            ("location", ("rsc",)),
            ("colocation", ("rsc", "with")),
            ("order", ("first", "then")),
        ):
            for i, con in enumerate(cons.get(kind, [])):
                jp = f"$.constraints.{kind}[{i}]"
                for key in keys:
                    if con[key] not in top_level:
                        at(
                            "SPEC_UNKNOWN_RESOURCE",
                            f"{jp}.{key}",
                            f"{con[key]!r} is not a resource",
                        )
                if kind == "location" and con["node"] not in names:
                    at("SPEC_UNKNOWN_NODE", f"{jp}.node", f"{con['node']!r} is not a cluster node")
                if "id" in con:
                    claim(con["id"], f"{jp}.id")
    except (KeyError, TypeError, AttributeError, ValueError, IndexError):
        if not schema_failed:
            raise
    if findings:
        raise SpecError(findings)

    props = {k: _str(v) for k, v in c.get("properties", {}).items()}
    if "policy" in quorum:
        props.setdefault("no-quorum-policy", quorum["policy"])
    return ClusterSpec(
        name=c["name"],
        nodes=nodes,
        transport=c.get("transport", "knet"),
        token_ms=c.get("token_ms"),
        crypto=c.get("crypto"),
        quorum_policy=quorum.get("policy"),
        two_node=quorum.get("two_node"),
        wait_for_all=quorum.get("wait_for_all"),
        properties=props,
        resources=resources,
        groups=groups,
        constraints={k: list(v) for k, v in cons.items()},
        prune=bool(data.get("prune", False)),
        raw=data,
        source=source,
    )


def _str(v: Any) -> str:
    """A CIB value: YAML booleans become pacemaker's true/false."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)

"""corosync.conf domain: parse, compare with the spec, render a converged file.

Only what the spec governs is compared (cluster name, transport, token, crypto, nodelist,
quorum); everything else in the live file (logging, extra totem knobs) is kept. The file is
rewritten only when a governed value differs, so an existing cluster whose file already
says what the spec says is left alone (``ok``), whoever wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from playbooks.spec import ClusterSpec

__all__ = [
    "RESTART_KEYS",
    "Section",
    "converge",
    "governed",
    "parse",
    "render",
]

# keys whose change corosync cannot take with `corosync-cfgtool -R`
RESTART_KEYS = ("totem.cluster_name", "totem.transport", "totem.crypto_cipher", "totem.crypto_hash")


@dataclass
class Section:
    name: str
    items: list[tuple[str, str | Section]] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        for k, v in self.items:
            if k == key and isinstance(v, str):
                return v
        return None

    def set(self, key: str, value: str) -> None:
        for i, (k, v) in enumerate(self.items):
            if k == key and isinstance(v, str):
                self.items[i] = (key, value)
                return
        self.items.append((key, value))

    def unset(self, key: str) -> None:
        self.items = [(k, v) for k, v in self.items if not (k == key and isinstance(v, str))]

    def sections(self, name: str) -> list[Section]:
        return [v for k, v in self.items if k == name and isinstance(v, Section)]

    def section(self, name: str) -> Section:
        found = self.sections(name)
        if found:
            return found[0]
        s = Section(name)
        self.items.append((name, s))
        return s


def parse(text: str) -> Section:
    root = Section("")
    stack = [root]
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("{"):
            s = Section(line[:-1].strip())
            stack[-1].items.append((s.name, s))
            stack.append(s)
        elif line == "}":
            if len(stack) > 1:
                stack.pop()
        elif ":" in line:
            k, v = line.split(":", 1)
            stack[-1].items.append((k.strip(), v.strip()))
    return root


def render(root: Section, *, header: str = "# managed by dtake playbooks (cluster)") -> str:
    out = [header]

    def emit(s: Section, depth: int) -> None:
        pad = "    " * depth
        for k, v in s.items:
            if isinstance(v, Section):
                out.append(f"{pad}{k} {{")
                emit(v, depth + 1)
                out.append(f"{pad}}}")
            else:
                out.append(f"{pad}{k}: {v}")

    emit(root, 0)
    return "\n".join(out) + "\n"


def governed(root: Section, spec: ClusterSpec | None = None) -> dict[str, str]:
    """The values the spec governs, flattened (``nodelist.node2.ring0_addr``...)."""
    totem = root.section("totem") if root.sections("totem") else Section("totem")
    out: dict[str, str] = {
        "totem.cluster_name": totem.get("cluster_name") or "",
        "totem.transport": totem.get("transport") or "knet",
    }
    if spec is None or spec.token_ms is not None:
        out["totem.token"] = totem.get("token") or ""
    if spec is None or spec.crypto is not None:
        out["totem.crypto_cipher"] = totem.get("crypto_cipher") or "none"
        out["totem.crypto_hash"] = totem.get("crypto_hash") or "none"
    quorum = root.sections("quorum")
    q = quorum[0] if quorum else Section("quorum")
    out["quorum.provider"] = q.get("provider") or ""
    if spec is None or spec.two_node is not None:
        out["quorum.two_node"] = q.get("two_node") or "0"
    if spec is None or spec.wait_for_all is not None:
        out["quorum.wait_for_all"] = q.get("wait_for_all") or "0"
    nl = root.sections("nodelist")
    for node in nl[0].sections("node") if nl else []:
        name = node.get("name") or node.get("ring0_addr") or "?"
        for k, v in node.items:
            if isinstance(v, str) and k != "name":
                out[f"nodelist.{name}.{k}"] = v
    return out


def _desired(spec: ClusterSpec) -> dict[str, str]:
    out = {
        "totem.cluster_name": spec.name,
        "totem.transport": spec.transport,
        "quorum.provider": "corosync_votequorum",
    }
    if spec.token_ms is not None:
        out["totem.token"] = str(spec.token_ms)
    if spec.crypto is not None:
        out["totem.crypto_cipher"] = "aes256" if spec.crypto else "none"
        out["totem.crypto_hash"] = "sha256" if spec.crypto else "none"
    if spec.two_node is not None:
        out["quorum.two_node"] = "1" if spec.two_node else "0"
    if spec.wait_for_all is not None:
        out["quorum.wait_for_all"] = "1" if spec.wait_for_all else "0"
    for n in spec.nodes:
        out[f"nodelist.{n.name}.nodeid"] = str(n.nodeid)
        for i, a in enumerate(n.addrs):
            out[f"nodelist.{n.name}.ring{i}_addr"] = a
    return out


def converge(live_text: str | None, spec: ClusterSpec) -> tuple[str | None, list[str]]:
    """(new file text or None when the live file already matches, changed keys)."""
    root = parse(live_text or "")
    want = _desired(spec)
    have = governed(root, spec)
    changed = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if not changed:
        return None, []
    totem = root.section("totem")
    if totem.get("version") is None:
        totem.set("version", "2")
    for key, value in want.items():
        sec, _, name = key.partition(".")
        if sec in ("totem", "quorum"):
            target = totem if sec == "totem" else root.section("quorum")
            if key == "quorum.provider":
                # keep the provider first, as corosync's own samples do
                target.unset("provider")
                target.items.insert(0, ("provider", value))
            else:
                target.set(name, value)
    # the node list is rebuilt whole, in spec order
    for s in root.sections("nodelist"):
        root.items.remove(("nodelist", s))
    nodelist = Section("nodelist")
    for n in spec.nodes:
        node = Section("node", [("name", n.name), ("nodeid", str(n.nodeid))])
        node.items.extend((f"ring{i}_addr", a) for i, a in enumerate(n.addrs))
        nodelist.items.append(("node", node))
    idx = next((i for i, (k, _) in enumerate(root.items) if k == "totem"), 0) + 1
    root.items.insert(idx, ("nodelist", nodelist))
    if not root.sections("logging"):
        log = root.section("logging")
        for k, v in (("to_syslog", "yes"), ("to_logfile", "yes")):
            log.set(k, v)
        log.set("logfile", "/var/log/corosync/corosync.log")
    return render(root), changed

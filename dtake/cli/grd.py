"""`dtake grd status|accept|reject|flush-target|revert-snapshot|test-data|fail RESOURCE [--node N]`.

The operator's side of online pending [L3376-3392]. Each control is recorded by the
service of the node that holds the replica (availability rules and events 10007-10012
there), then ``crm_resource --refresh`` makes pacemaker probe it at once, so the new
promotion score is seen and pacemaker promotes (or not) with no further step.

``--node N`` for another node: the command runs there over ssh (the cluster's nodes
reach each other as root, as pcs/crm do); without it, the local node.
``fail`` also bans the promoted role from the node (``crm_resource --ban --promoted``),
as crm-fence-peer does; ``accept`` lifts that ban.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dtake.client import Client

__all__ = ["add_parsers", "render_status", "run"]

ACTIONS = ("accept", "reject", "flush-target", "revert-snapshot", "test-data", "fail")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser(
        "grd", parents=[common], help="ReplicatedDisk replicas: status and online-pending controls"
    ).add_subparsers(dest="grd_action", required=True)
    for name, text in (
        ("status", "data state, generation and the seed's status text of a replica"),
        ("accept", "use this node's data: it is promoted and overwrites the others [L3391]"),
        ("reject", "revert to the test-data snapshot, back to online pending [L3392]"),
        ("flush-target", "discard the target queue, then promote [L3387]"),
        ("revert-snapshot", "revert to the latest snapshot, then promote [L3386]"),
        ("test-data", "snapshot the data to test it; accept or reject next [L3389]"),
        ("fail", "never promote this node's copy; no connection [L3388]"),
    ):
        s = g.add_parser(name, parents=[common], help=text)
        s.add_argument("resource")
        s.add_argument("--node", help="the node holding the replica (default: this node)")
        if name == "revert-snapshot":
            s.add_argument(
                "--snapshot",
                default="",
                metavar="ID",
                help="the snapshot to revert to (`dtake snapshot list DIR`; default: the latest)",
            )
        if name != "status":
            s.add_argument(
                "--no-refresh",
                action="store_true",
                help="do not ask pacemaker to re-probe the resource afterwards",
            )


def render_status(st: dict[str, Any]) -> str:
    lines = [
        f"{st['resource']} on {st['node']}: {st['role']}, data {st['data']}, "
        f"generation {st['generation']} (sequence {st['sequence']})",
        f"  {st['status_text']}",
    ]
    if st.get("reason"):
        lines.append(f"  reason: {st['reason']}")
    if st.get("control"):
        lines.append(f"  operator control: {st['control']}")
    if st.get("target_data_state") and st.get("role") != "Promoted":
        lines.append(f"  target data state of this copy: {st['target_data_state']}")
    if st.get("queued_bytes"):
        lines.append(f"  target queue: {st['queued_bytes']} bytes not applied yet")
    if st.get("source_node"):
        lines.append(
            f"  source: {st['source_node']} generation {st['source_generation']} "
            f"({'connected' if st.get('source_connected') else 'not connected'})"
        )
    for t in st.get("targets", []):
        lines.append(
            f"  target {t['node']}: {t['state']} ({t['transmit']}, mirror {t['mirror']}, "
            f"{t['target_data_state']})"
        )
    avail = st.get("available", {})
    ok = [a for a in ACTIONS if not avail.get(a)]
    lines.append(f"  available: {', '.join(ok) or 'none'}")
    for a in ACTIONS:
        if avail.get(a):
            lines.append(f"    {a}: {avail[a]}")
    return "\n".join(lines)


def _local_node() -> str:
    return os.uname().nodename


def _remote(args: argparse.Namespace, runner: Runner) -> int:
    """Run the same command on NODE (it talks to its own service)."""
    argv = ["dtake", "grd", args.grd_action, args.resource]
    if args.json:
        argv.append("--json")
    if getattr(args, "no_refresh", False):
        argv.append("--no-refresh")
    if getattr(args, "snapshot", ""):
        argv += ["--snapshot", args.snapshot]
    r = runner(["ssh", "-o", "BatchMode=yes", args.node, *argv])
    if r.stdout:
        print(r.stdout, end="")
    if r.stderr:
        print(r.stderr, end="", file=sys.stderr)
    return int(r.returncode)


def run(args: argparse.Namespace, client: Client, *, runner: Runner = _run) -> int | None:
    if args.cmd != "grd":
        return None
    node = args.node
    if node and node not in (_local_node(), socket.gethostname()):
        return _remote(args, runner)
    if args.grd_action == "status":
        st = client.call("replica_status", resource=args.resource)
        print(json.dumps(st, indent=1) if args.json else render_status(st))
        return 0
    user = os.environ.get("SUDO_USER") or os.environ.get("USER") or "root"
    extra = {"snapshot": args.snapshot} if getattr(args, "snapshot", "") else {}
    st = client.call(
        "replica_control", resource=args.resource, action=args.grd_action, user=user, **extra
    )
    me = st.get("node") or _local_node()
    clone = _clone_of(args.resource, runner)
    if args.grd_action == "fail":
        runner(["crm_resource", "--ban", "--promoted", "-r", clone, "-N", me, "--quiet"])
    elif args.grd_action == "accept":
        runner(["crm_resource", "--clear", "--promoted", "-r", clone, "-N", me, "--quiet"])
    if not args.no_refresh:
        # Probe now: the monitor publishes the new score and pacemaker acts on it.
        r = runner(["crm_resource", "--refresh", "-r", args.resource, "-N", me])
        if r.returncode != 0:
            st.setdefault("warnings", []).append(f"crm_resource --refresh: {r.stderr.strip()}")
    print(json.dumps(st, indent=1) if args.json else render_status(st))
    return 0


def _clone_of(resource: str, runner: Runner) -> str:
    """The promotable clone wrapping RESOURCE (constraints name the clone)."""
    r = runner(["cibadmin", "--query", "--scope", "resources"])
    if r.returncode != 0:
        return resource
    import re

    for m in re.finditer(r"<clone\b[^>]*\bid=\"([^\"]+)\"(.*?)</clone>", r.stdout, re.S):
        if re.search(rf"<primitive\b[^>]*\bid=\"{re.escape(resource)}\"", m.group(2)):
            return m.group(1)
    return resource

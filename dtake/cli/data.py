"""`dtake` subcommands for data safety: snapshots, target data state, blocked paths,
restore, scheduled verification, DTStat-like statistics and Prometheus text.

Registered in ``dtake.cli.main.EXTENSIONS``. Snapshots, data state and blocking act on
the service that HOLDS the copy (the target node); restore and verify-schedule on the
source node that owns the connection. Every command takes ``--json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from typing import Any

__all__ = ["add_parsers", "run"]

COMMANDS = (
    "snapshot",
    "datastate",
    "block",
    "unblock",
    "blocked",
    "restore",
    "verify-schedule",
    "dtstat",
    "metrics",
)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser(
        "snapshot", parents=[common], help="snapshots of target data (on the target node)"
    ).add_subparsers(dest="action", required=True)
    s = sp.add_parser("take", parents=[common], help="take a snapshot now (any data state)")
    s.add_argument("target", help="connection uuid or target path")
    sp_list = sp.add_parser("list", parents=[common], help="list snapshots")
    sp_list.add_argument("target", nargs="?", help="connection uuid or target path")
    s = sp.add_parser(
        "revert", parents=[common], help="revert the target copy (data state: Snapshot Reverted)"
    )
    s.add_argument("target")
    s.add_argument("snapshot", help='snapshot id, "latest" or "last-good"')
    s = sp.add_parser("delete", parents=[common], help="delete a snapshot")
    s.add_argument("target")
    s.add_argument("snapshot")
    s = sp.add_parser(
        "schedule", parents=[common], help="scheduled snapshots (>= 15 minutes apart)"
    )
    s.add_argument("target")
    s.add_argument("--every", type=float, metavar="MINUTES", help="interval in minutes")
    s.add_argument("--start", help='first snapshot: epoch seconds or "now" (default now)')
    g = s.add_mutually_exclusive_group()
    g.add_argument("--enable", dest="enabled", action="store_const", const=True)
    g.add_argument("--disable", dest="enabled", action="store_const", const=False)
    g.add_argument("--remove", action="store_true")

    s = sub.add_parser(
        "datastate", parents=[common], help="target data state of the copies held here"
    )
    s.add_argument("target", nargs="?")
    s.add_argument(
        "--set",
        dest="set_state",
        choices=["OK", "Mirroring", "Mirror Required", "Restore Required", "Snapshot Reverted"],
        help="set the state (agents: Restore Required after a failover)",
    )
    s.add_argument("--reason", default="")

    for name, helptext in (
        ("block", "make a target path read-only for every other process"),
        ("unblock", "make a blocked target path writable again"),
    ):
        s = sub.add_parser(name, parents=[common], help=helptext)
        s.add_argument("path")
    sub.add_parser("blocked", parents=[common], help="list blocked target paths")

    s = sub.add_parser(
        "restore",
        parents=[common],
        help="copy the target's data back to the source [L4674-4800]",
        description="restore ID: one pass over connection ID (on the source node). "
        "restore connect SOURCE[:PORT] --repset NAME: a restoration connection "
        "(NAME_Restore) from this target node to the source, which keeps replicating "
        "target -> source until `dtake disconnect`. restore repsets: the copies held "
        "here and the backup of their replication sets. restore release ID: end the "
        "hold of connection ID on the source node.",
    )
    s.add_argument("what", help="connection ID | connect | repsets | release")
    s.add_argument("arg", nargs="?", help="connect: SOURCE[:PORT]; release: connection ID")
    s.add_argument("--mode", choices=["differences", "full"], default="differences")
    s.add_argument("--orphans", choices=["off", "log", "delete", "move"])
    s.add_argument("--orphans-age", type=float, default=0.0, metavar="SECONDS")
    s.add_argument("--repset", help="connect: the replication set to restore")
    s.add_argument("--from", dest="from_path", help="connect: the copy's path (several copies)")
    s.add_argument("--mirror", choices=["differences", "full", "checksum"], default="differences")
    s.add_argument(
        "--use-backup-repset", action="store_true", help="the target's copy of the set [L4714]"
    )
    s.add_argument(
        "--restore-repset", action="store_true", help="write it back to the source [L4715]"
    )
    s.add_argument("--block", action="store_true", help="block the source path meanwhile")

    s = sub.add_parser("verify-schedule", parents=[common], help="scheduled verification")
    s.add_argument("id", type=int)
    s.add_argument("--start", help='epoch seconds or "now" (default now)')
    s.add_argument("--every", type=float, default=0, help="reverification interval")
    s.add_argument("--unit", choices=["minutes", "hours", "days"], default="minutes")
    s.add_argument("--remirror", action="store_true")
    s.add_argument("--newer", action="store_true", help="remirror only if the source is newer")
    s.add_argument("--checksum", action="store_true")
    s.add_argument("--remove", action="store_true")

    s = sub.add_parser("dtstat", parents=[common], help="statistics in the DTStat layout")
    s.add_argument("--csv", action="store_true", help="connection data as CSV (dtstat -s)")
    sub.add_parser("metrics", parents=[common], help="statistics in Prometheus text format")


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=1, default=str) if args.json else text)


def _when(v: str | None) -> float | None:
    if v is None or v == "now":
        return None
    return float(v)


def _snap_line(r: dict[str, Any]) -> str:
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
    return f"{r['id']:<26} {ts}  {r['kind']:<9} {r['provider']:<5} {r['data_state'] or '-':<16} {r['target_path']}"


def run(args: argparse.Namespace, cl: Any) -> int | None:
    cmd = args.cmd
    if cmd not in COMMANDS:
        return None
    if cmd == "snapshot":
        a = args.action
        if a == "take":
            r = cl.call("snapshot_take", timeout=600, target=args.target)
            _out(args, r, f"snapshot {r['id']} of {r['target_path']} ({r['provider']})")
        elif a == "list":
            r = cl.call("snapshot_list", target=args.target)
            _out(args, r, "\n".join(_snap_line(x) for x in r) or "no snapshots")
        elif a == "revert":
            r = cl.call("snapshot_revert", timeout=3600, target=args.target, snapshot=args.snapshot)
            _out(args, r, f"{r['target_path']} reverted to snapshot {r['id']}")
        elif a == "delete":
            r = cl.call("snapshot_delete", target=args.target, snapshot=args.snapshot)
            _out(args, r, f"snapshot {r['id']} deleted")
        elif a == "schedule":
            r = cl.call(
                "snapshot_schedule",
                target=args.target,
                interval_min=args.every,
                start=_when(args.start),
                enabled=args.enabled,
                remove=args.remove,
            )
            sch = r["schedule"]
            _out(
                args,
                r,
                "no schedule"
                if sch is None
                else f"every {sch['interval_s'] / 60:g} min, next {time.ctime(sch['next_due'])}"
                + ("" if sch["enabled"] else " (disabled)"),
            )
        return 0
    if cmd == "datastate":
        if args.set_state:
            r = cl.call(
                "data_state_set", target=args.target, state=args.set_state, reason=args.reason
            )
            _out(args, r, f"{r['uuid']}: {r['old']} -> {r['data_state']}")
            return 0
        rows = cl.call("data_state", target=args.target)
        text = "\n".join(
            f"{x['uuid']}  {x['target_path']:<30} {x['data_state']:<18} "
            f"{'blocked' if x['blocked'] else '':<8} {x['snapshots']} snapshot(s)  {x['reason']}"
            for x in rows
        )
        _out(args, rows, text or "no target copies")
        return 0
    if cmd in ("block", "unblock"):
        r = cl.call(cmd, path=args.path)
        _out(args, r, f"{r['path']}: {'blocked' if r['blocked'] else 'unblocked'}")
        return 0
    if cmd == "blocked":
        r = cl.call("blocked")
        _out(args, r, "\n".join(r) or "no blocked paths")
        return 0
    if cmd == "restore" and not args.what.isdigit():
        return _restore_connection(args, cl)
    if cmd == "restore":
        r = cl.call(
            "restore", timeout=None, con_id=int(args.what), mode=args.mode, orphans=args.orphans
        )
        _out(
            args,
            r,
            f"connection {args.what}: restored {r['files']} files ({r['bytes']} bytes), "
            f"{r['dirs']} directories, {r['links']} links; {r['orphans']} orphan(s) {r['orphans_mode']}",
        )
        return 0
    if cmd == "verify-schedule":
        r = cl.call(
            "verify_schedule",
            con_id=args.id,
            start=_when(args.start),
            interval=args.every,
            unit=args.unit,
            remirror=args.remirror,
            newer=args.newer,
            checksum=args.checksum,
            remove=args.remove,
        )
        sch = r["schedule"]
        _out(
            args,
            r,
            "no schedule" if sch is None else f"next verification {time.ctime(sch['next_due'])}",
        )
        return 0
    if cmd == "dtstat":
        from dtake.service.metrics import render_dtstat

        d = cl.call("dtstat")
        if args.csv and not args.json:
            buf = io.StringIO()
            rows = d["CONNECTION"]
            if rows:
                w = csv.DictWriter(buf, fieldnames=["Managed Pagefile Alloc", *rows[0].keys()])
                w.writeheader()
                for row in rows:
                    w.writerow({"Managed Pagefile Alloc": 0, **row})
            print(buf.getvalue(), end="")
        else:
            _out(args, d, render_dtstat(d))
        return 0
    if cmd == "metrics":
        text = cl.call("metrics_text")
        _out(args, {"text": text}, text.rstrip("\n"))
        return 0
    return None


def _restore_connection(args: argparse.Namespace, cl: Any) -> int:
    from dtake.cli.main import EXIT_USAGE

    if args.what == "repsets":
        rows = cl.call("restore_repsets", repset=args.repset)
        text = "\n".join(
            f"{x['repset']:<14} from {x['source_node'] or '?':<10} copy {x['target_path']:<28} "
            f"base {x['source_base'] or '-':<24} "
            + ("; ".join(x["rules"]) if x["rules"] else "(no backup of the rules)")
            for x in rows
        )
        _out(args, rows, text or "no copies held here")
        return 0
    if args.what == "release" and args.arg and args.arg.isdigit():
        r = cl.call("restore_release", con_id=int(args.arg))
        _out(args, r, f"connection {r['id']}: released, {r['target_data_state']}")
        return 0
    if args.what == "connect" and args.arg and args.repset:
        r = cl.call(
            "restore_connect",
            timeout=120,
            source=args.arg,
            repset=args.repset,
            from_path=args.from_path,
            use_backup=args.use_backup_repset,
            restore_repset=args.restore_repset,
            mirror=args.mirror,
            orphans=args.orphans or "off",
            orphans_age_s=args.orphans_age,
            block=args.block,
        )
        _out(
            args,
            r,
            f"{r['id']}  {r['repset']}: {r['restore_from']} -> {r['target']}:{r['restore_to']}",
        )
        return 0
    print(
        "usage: dtake restore ID | connect SOURCE[:PORT] --repset NAME | repsets | release ID",
        file=sys.stderr,
    )
    return int(EXIT_USAGE)

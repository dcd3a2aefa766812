"""`dtake` command line: parses argv, calls the service over the control socket, renders.

Exit codes: 0 success; 1 the service refused or failed (the seed's error code is
printed, and is in ``--json`` output as ``error.code``); 2 usage error; 3 ``wait``
timed out; 4 the service is not reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from dtake.client import Client
from dtake.errors import DtakeError, E

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


def _hostport(text: str) -> tuple[str, int]:
    from dtake.config import split_hostport  # only here: it imports yaml

    try:
        return split_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    # --socket/--json are accepted before or after the subcommand; the subcommands'
    # copies use other dests (merged in main()) so they never overwrite a value given
    # before the subcommand.
    sock_help = "control socket (default: $DTAKE_SOCKET, then /run/dtake/dtake.sock)"
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--socket", help=sock_help)
    top.add_argument("--json", action="store_true", help="machine-readable output")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", dest="sub_socket", metavar="SOCKET", help=sock_help)
    common.add_argument(
        "--json", dest="sub_json", action="store_true", help="machine-readable output"
    )
    p = argparse.ArgumentParser(
        prog="dtake",
        description="dtake: high-availability file replication (Double-Take Availability for Linux clusters)",
        parents=[top],
        epilog="Exit codes: 0 ok, 1 refused/failed (seed error code shown), 2 usage, 3 wait timed out, 4 service unreachable.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the replication service (one per node)")
    s.add_argument("--config", required=True, help="service configuration (YAML)")

    s = sub.add_parser(
        "keygen", parents=[common], help="create the cluster auth key file (mode 0600)"
    )
    s.add_argument("file")
    s.add_argument("--force", action="store_true", help="overwrite an existing key")

    sub.add_parser("status", parents=[common], help="connections and their states")
    sub.add_parser("stats", parents=[common], help="statistics per connection and target")

    s = sub.add_parser("events", parents=[common], help="event log (seed event IDs)")
    s.add_argument("--since", type=int, default=0, help="only events after this sequence number")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing new events")

    rs = sub.add_parser("repset", parents=[common], help="replication sets").add_subparsers(
        dest="action", required=True
    )
    s = rs.add_parser("create", parents=[common], help="create a replication set from rules")
    s.add_argument("name")
    s.add_argument(
        "--rule",
        action="append",
        required=True,
        help='seed rule form: "PATH inc, rec", "PATH/tmp exc, rec", "/data/*.db inc" (repeatable)',
    )
    s.add_argument("--replace", action="store_true", help="replace the rules of an existing set")
    rs.add_parser("list", parents=[common], help="list replication sets")
    s = rs.add_parser("show", parents=[common], help="show one replication set")
    s.add_argument("name")
    s = rs.add_parser(
        "delete", parents=[common], help="delete a replication set (refused while connected, -130)"
    )
    s.add_argument("name")

    s = sub.add_parser(
        "connect",
        parents=[common],
        help="connect a replication set to a target; prints the connection ID",
    )
    s.add_argument("repset")
    s.add_argument("target", type=_hostport, metavar="HOST[:PORT]")
    s.add_argument(
        "--target-path", required=True, help="directory on the target that receives the set's base"
    )
    s.add_argument(
        "--mirror",
        default="differences",
        choices=["full", "differences", "checksum", "newer", "none"],
    )
    s.add_argument("--orphans", default="off", choices=["off", "log", "delete", "move"])
    s.add_argument(
        "--orphans-age",
        type=float,
        default=0,
        metavar="SECONDS",
        help="only orphans not modified within this many seconds",
    )
    s.add_argument(
        "--block", action="store_true", help="target path read-only for others while connected"
    )
    s.add_argument("--compression", default="none", choices=["none", "zlib", "zstd"])
    s.add_argument("--level", type=int, default=None, help="compression level")

    s = sub.add_parser(
        "disconnect", parents=[common], help="disconnect (discards the source queue)"
    )
    s.add_argument("id", type=int)

    s = sub.add_parser("mirror", parents=[common], help="control the mirror of a connection")
    s.add_argument("action", choices=["start", "stop", "pause", "resume"])
    s.add_argument("id", type=int)
    s.add_argument("--mode", choices=["full", "differences", "checksum", "newer"])
    # `transmit start|stop|pause|resume ID` and `transmit schedule`: dtake.cli.transmit

    s = sub.add_parser(
        "verify", parents=[common], help="compare source and target; report differing files"
    )
    s.add_argument("id", type=int)
    s.add_argument("--remirror", action="store_true", help="send the differing files again")
    s.add_argument(
        "--checksum", action="store_true", help="compare block checksums, not only size and time"
    )

    s = sub.add_parser(
        "wait",
        parents=[common],
        help="wait until a connection is idle (mirror done, nothing queued or unacknowledged)",
    )
    s.add_argument("id", type=int)
    s.add_argument("--idle", action="store_true", required=True)
    s.add_argument("--timeout", type=float, default=300.0)
    for ext in _extensions():
        ext.add_parsers(sub, common)
    return p


# Feature modules add subcommands without touching this file: each module in
# EXTENSIONS defines add_parsers(subparsers, common) and
# run(args, client) -> int | None (None: not my command).
EXTENSIONS: tuple[str, ...] = ("dtake.cli.data", "dtake.cli.grd", "dtake.cli.transmit")


def _extensions() -> list[Any]:
    import importlib

    return [importlib.import_module(name) for name in EXTENSIONS]


def _print(obj: Any, args: argparse.Namespace, text: str | None = None) -> None:
    if args.json:
        print(json.dumps(obj, indent=1, default=str))
    elif text is not None:
        print(text)


def _render_status(st: dict[str, Any]) -> str:
    lines = [f"node {st['node']}  dtake {st['version']}  port {st['port']}  up {st['uptime_s']}s"]
    if st["connections"]:
        lines.append(
            f"{'ID':>3}  {'REPSET':<14} {'TARGET':<22} {'STATE':<8} {'MIRROR':<10} {'REPLICATION':<12} {'TARGET DATA':<16} QUEUED"
        )
        for c in st["connections"]:
            lines.append(
                f"{c['id']:>3}  {c['repset']:<14} {c['target']:<22} {c['state']:<8} {c['mirror_status']:<10} "
                f"{c['replication_status']:<12} {c['target_data_state']:<16} {c['queued_items']}"
            )
            if c.get("last_error"):
                lines.append(f"     last error: {c['last_error']}")
            r = c.get("resync")
            if r:  # docs/resync-journal.md
                how = f"{r.get('paths')} paths" if r["method"] == "journal" else r.get("reason")
                lines.append(f"     last resync: {r['method']} ({how})")
    else:
        lines.append("no connections")
    for j in st.get("journals", []):
        lines.append(
            f"change journal {j['repset']} -> {j['target']}:{j['target_path']}  {j['paths']} paths"
            + ("" if j["valid"] else f"  not usable: {j['reason'] or 'disconnect in progress'}")
        )
    for t in st.get("targets", []):
        lines.append(
            f"target for {t['source_node']} ({t['repset']}, ID {t['conn_id']}) -> {t['target_path']}"
            f"  {'connected' if t['connected'] else 'not connected'}  applied seq {t['last_seq']}"
        )
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "serve":
        from dtake.config import load_config
        from dtake.service.daemon import serve

        return serve(load_config(args.config))
    if args.cmd == "keygen":
        from dtake.protocol.auth import generate_key_file

        generate_key_file(args.file, force=args.force)
        _print(
            {"file": args.file, "created": True}, args, f"key written to {args.file} (mode 0600)"
        )
        return EXIT_OK

    with Client(args.socket) as cl:
        for ext in _extensions():
            rc = ext.run(args, cl)
            if rc is not None:
                return int(rc)
        if args.cmd == "status":
            st = cl.call("status")
            _print(st, args, _render_status(st))
        elif args.cmd == "stats":
            st = cl.call("stats")
            _print(st, args, json.dumps(st, indent=1))
        elif args.cmd == "events":
            since = args.since
            while True:
                evs = cl.call("events", since=since)
                if args.json and not args.follow:
                    _print(evs, args)
                else:
                    for e in evs:
                        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
                        print(
                            json.dumps(e)
                            if args.json
                            else f"{ts} {e['id']:>5} {e['severity']:<7} {e['message']}",
                            flush=True,
                        )
                if evs:
                    since = evs[-1]["seq"]
                if not args.follow:
                    break
                time.sleep(0.5)
        elif args.cmd == "repset":
            if args.action == "create":
                r = cl.call("repset_create", name=args.name, rules=args.rule, replace=args.replace)
                _print(
                    r,
                    args,
                    f"replication set {r['name']} ({'changed' if r['changed'] else 'unchanged'}), base {r['base']}",
                )
            elif args.action == "list":
                r = cl.call("repset_list")
                _print(
                    r,
                    args,
                    "\n".join(f"{x['name']:<20} {'; '.join(x['rules'])}" for x in r)
                    or "no replication sets",
                )
            elif args.action == "show":
                r = cl.call("repset_show", name=args.name)
                _print(
                    r,
                    args,
                    "\n".join(
                        [f"name: {r['name']}", f"base: {r['base']}", "rules:"]
                        + [f"  {x}" for x in r["rules"]]
                    ),
                )
            elif args.action == "delete":
                r = cl.call("repset_delete", name=args.name)
                _print(r, args, f"replication set {args.name} deleted")
        elif args.cmd == "connect":
            host, port = args.target
            r = cl.call(
                "connect",
                repset=args.repset,
                host=host,
                port=port,
                target_path=args.target_path,
                mirror=args.mirror,
                orphans=args.orphans,
                compression=args.compression,
                compression_level=args.level,
                block=args.block,
                orphans_age_s=args.orphans_age,
            )
            _print(r, args, str(r["id"]))
        elif args.cmd == "disconnect":
            r = cl.call("disconnect", con_id=args.id)
            _print(r, args, f"connection {args.id} disconnected")
        elif args.cmd == "mirror":
            r = cl.call("mirror", con_id=args.id, action=args.action, mode=args.mode)
            _print(r, args, f"connection {args.id}: mirror {r['mirror_status']}")
        elif args.cmd == "verify":
            r = cl.call(
                "verify",
                timeout=3600,
                con_id=args.id,
                remirror=args.remirror,
                checksum=args.checksum,
            )
            text = [
                f"connection {args.id}: {r['files_checked']} files checked, {r['different']} differences"
            ]
            text += [f"  {d['path']}: {d['reason']}" for d in r["differences"]]
            if r["orphans"]:
                text.append(f"  {len(r['orphans'])} orphan(s) on the target")
            _print(r, args, "\n".join(text))
        elif args.cmd == "wait":
            try:
                r = cl.call(
                    "wait", timeout=args.timeout + 30, con_id=args.id, timeout_s=args.timeout
                )
            except DtakeError as exc:
                if exc.code == E.TIMEOUT:
                    _err(exc, args)
                    return EXIT_TIMEOUT
                raise
            _print(r, args, f"connection {args.id} idle")
    return EXIT_OK


def _err(exc: DtakeError, args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": exc.to_dict()}, default=str))
    else:
        print(f"dtake: error {exc.code}: {exc.message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.socket = getattr(args, "sub_socket", None) or args.socket
    args.json = bool(getattr(args, "sub_json", False) or args.json)
    try:
        return _run(args)
    except DtakeError as exc:
        _err(exc, args)
        return EXIT_UNREACHABLE if exc.code == E.SERVER_NOT_RESPONDING else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`dtake` subcommands for queues and transmission: target pause/resume, transmission
schedules, bandwidth limits and compression (seed §5.2, §6.1, §12).

Registered in ``dtake.cli.main.EXTENSIONS``. ``target`` acts on the service that is the
target; ``transmit start|stop|pause|resume ID`` act on one connection of the source;
``transmit schedule``, ``bandwidth`` and ``compression`` act on the source, for one
target IP (or a connection ID standing for its target IP): the seed shares them between
all connections from one source to the same target IP [L5501, L5534, L5573].
``transmit-schedule TARGET ...`` is a hidden alias of ``transmit schedule`` kept for
scripts written before the schedule moved under ``transmit``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parsers", "run"]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    tp = sub.add_parser(
        "target",
        parents=[common],
        help="pause/resume applying on this target server (all its connections) [L4987-4999]",
    ).add_subparsers(dest="action", required=True)
    tp.add_parser("pause", parents=[common], help="finish ops in progress, then hold (Paused)")
    tp.add_parser("resume", parents=[common], help="apply the target queue again")
    tp.add_parser("status", parents=[common], help="target status and target queue figures")
    d = tp.add_parser(
        "discard",
        parents=[common],
        help="drop what one connection queued here, not yet applied (Flush Target [L3387])",
    )
    d.add_argument("con_id", type=int, help="the source's connection ID (see `dtake status`)")

    s = sub.add_parser(
        "bandwidth",
        parents=[common],
        help="bandwidth limit shared by all connections to one target IP [L5528-5566]",
    )
    s.add_argument("target", help="target IP (as used in connect) or a connection ID")
    s.add_argument(
        "action",
        nargs="?",
        default="show",
        choices=("show", "none", "fixed", "scheduled", "import", "export"),
        help="none: no limit; fixed: --kbps; scheduled: the weekly schedule; import FILE "
        "replaces the schedule; export prints it as XML",
    )
    s.add_argument("file", nargs="?", help="XML file for import")
    s.add_argument("--kbps", type=float, help="fixed limit in kbps (>= 28.8, never 0)")

    s = sub.add_parser(
        "compression",
        parents=[common],
        help="compression shared by all connections to one target IP [L5569-5583]",
    )
    s.add_argument("target", help="target IP or a connection ID")
    s.add_argument("action", nargs="?", default="show", choices=("show", "set", "off"))
    s.add_argument("--algorithm", default="zlib", choices=("zlib", "zstd", "none"))
    s.add_argument("--level", type=int, help="zlib 1-9, zstd 1-19 (default: the codec's)")

    # The actions' own --json/--socket default to "not given" so that a flag given
    # before the action (`transmit --json schedule ...`) is not reset by the action's
    # parser (argparse lets a subparser's defaults overwrite its parent's values).
    inner = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    inner.add_argument("--socket", dest="sub_socket", metavar="SOCKET", help="control socket")
    inner.add_argument(
        "--json", dest="sub_json", action="store_true", help="machine-readable output"
    )
    tx = sub.add_parser(
        "transmit",
        parents=[common],
        help="control transmission: start|stop|pause|resume ID, schedule TARGET [L5485-5526]",
        description="Stopped closes the socket and keeps queueing; Paused keeps the socket "
        "and sends nothing; the schedule belongs to a target IP (all its connections).",
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("start", "transmit (also retries after a failed auto-reconnect)"),
        ("stop", "close the socket, keep queueing (spills to disk)"),
        ("pause", "keep the socket, send nothing, keep queueing"),
        ("resume", "send again after pause"),
    ):
        s = tx.add_parser(action, parents=[inner], help=text)
        s.add_argument("id", type=int, help="connection ID")
    s = tx.add_parser(
        "schedule",
        parents=[inner],
        help="transmission schedule for one target IP: start/stop criteria, window [L5497-5526]",
    )
    _schedule_args(s)
    # Hidden alias (the form before `transmit schedule`): no help=, so not listed.
    s = sub.add_parser("transmit-schedule", parents=[common])
    _schedule_args(s)


def _schedule_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("target", help="target IP or a connection ID")
    s.add_argument(
        "sched_action",
        metavar="ACTION",
        nargs="?",
        default="show",
        choices=("show", "set", "enable", "disable", "clear"),
        help="show (default); set (replaces the schedule with the options given); enable; "
        "disable (keeps the settings); clear",
    )
    s.add_argument("--start-at", action="append", metavar="HH:MM", help="daily start time")
    s.add_argument("--start-queued-mb", type=float, help="start once this much is queued")
    s.add_argument("--stop-at", metavar="HH:MM", help="daily stop time")
    s.add_argument("--stop-after-min", type=float, help="stop after transmitting this long")
    s.add_argument(
        "--window", nargs=2, metavar=("BEGIN", "END"), help="HH:MM HH:MM (may cross midnight)"
    )


def _print(obj: Any, args: argparse.Namespace, text: str) -> None:
    print(json.dumps(obj, indent=1, default=str) if args.json else text)


def run(args: argparse.Namespace, cl: Any) -> int | None:
    if args.cmd == "target" and args.action == "discard":
        r = cl.call("target_discard", con_id=args.con_id)
        _print(r, args, f"discarded {r['discarded_ops']} ops; data state {r['data_state']}")
        return 0
    if args.cmd == "target":
        r = cl.call("target", action=args.action)
        _print(
            r,
            args,
            f"target {r['status']}: {r['queue_ops']} ops, {r['queue_bytes']} bytes queued",
        )
        return 0
    if args.cmd == "transmit" and args.action != "schedule":
        r = cl.call("transmit", con_id=args.id, action=args.action)
        _print(r, args, f"connection {args.id}: transmission {r['state']}")
        return 0
    if args.cmd == "transmit-schedule" or args.cmd == "transmit":
        r = cl.call(
            "transmit_schedule",
            target=args.target,
            action=args.sched_action,
            start_at=args.start_at,
            start_queued_mb=args.start_queued_mb,
            stop_at=args.stop_at,
            stop_after_min=args.stop_after_min,
            window=args.window,
        )
        sch = r["schedule"]
        text = (
            f"{r['target']}: schedule {'enabled' if sch['enabled'] else 'disabled'}, "
            f"transmission {'active' if r['active'] else 'waiting'}; start at "
            f"{', '.join(sch['start_at']) or '-'}, start at {sch['start_queued_mb'] or '-'} MB "
            f"queued, stop at {sch['stop_at'] or '-'}, stop after "
            f"{sch['stop_after_min'] or '-'} min, window "
            f"{'-'.join(sch['window']) if sch['window'] else 'none'}"
        )
        _print(r, args, text)
        return 0
    if args.cmd == "bandwidth":
        xml = None
        if args.action == "import":
            if not args.file:
                raise SystemExit("dtake bandwidth TARGET import FILE")
            with open(args.file, encoding="utf-8") as fh:
                xml = fh.read()
        r = cl.call("bandwidth", target=args.target, action=args.action, kbps=args.kbps, xml=xml)
        if args.action == "export" and not args.json:
            print(r["xml"], end="")
            return 0
        bw, lim = r["bandwidth"], r["limiter"]
        limit = lim["limit_kbps"]
        text = (
            f"{r['target']}: mode {bw['mode']}, limit now "
            f"{'Unlimited' if limit is None else f'{limit:g} kbps'}"
            f"{' (' + r['period'] + ')' if bw['mode'] == 'scheduled' else ''}; "
            f"{len(bw['events'])} scheduled event(s); sent {lim['bytes_total']} bytes, "
            f"waited {lim['waited_s']} s"
        )
        _print(r, args, text)
        return 0
    if args.cmd == "compression":
        r = cl.call(
            "compression",
            target=args.target,
            action=args.action,
            algorithm=args.algorithm,
            level=args.level,
        )
        comp = r["compression"]
        lines = [
            f"{r['target']}: compression {comp[0] + ' ' + str(comp[1]) if comp else 'per connection'}"
        ]
        for c in r["connections"]:
            lines.append(
                f"  connection {c['id']}: {c['compression']} {c['level'] or ''}  sent "
                f"{c['bytes_sent_uncompressed']} bytes, {c['bytes_sent_compressed']} on the "
                f"wire (ratio {c['compression_ratio']})"
            )
        _print(r, args, "\n".join(lines))
        return 0
    return None

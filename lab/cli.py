"""``python -m lab``: argv and rendering only; the work is done by :class:`lab.Lab`.

Exit codes: 0 ok, 1 lab error, 2 usage, 3 machine lacks what the lab needs;
``exec`` returns the command's own status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from .core import Lab
from .errors import LabError, PreflightError
from .settings import DEFAULT_N, MAX_NODES

USAGE = """python -m lab [--prefix P] [--state-dir DIR] COMMAND
  up [N]             start N nodes (default 3, max 9); idempotent; prints stage timings
  down [--force]     end every process the lab started, delete its netns and state
  status             nodes, their services, and crm_mon's view
  exec NODE CMD...   run CMD inside NODE (all of its namespaces)
  ssh NODE [CMD...]  ssh as root to NODE with the lab key (through the lab network)
  kill NODE          pull the plug (SIGKILL the node's pid-namespace init)
  start NODE         power on a killed node / start its cluster stack
  stop NODE          graceful stop of pacemaker and corosync on NODE
  netdown NODE       unplug NODE's network cable (partition); netup NODE replugs it
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab", usage=USAGE, add_help=True)
    p.add_argument("--prefix", default=None, help="lab name (netns prefix); env DTAKE_LAB_PREFIX")
    p.add_argument("--state-dir", default=None, help="env DTAKE_LAB_STATE_DIR")
    p.add_argument("--crypto", action="store_true", help="up: knet aes256/sha256")
    p.add_argument("--fence-dummy", action="store_true", help="up: stonith on, fence_dummy")
    p.add_argument("command")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _print_status(lab: Lab) -> None:
    st = lab.status()
    if not st.up:
        print(f"lab {lab.prefix}: not up (state dir {lab.state_dir})")
        return
    print(f"lab {lab.prefix}: {st.n} nodes, state dir {st.state_dir}, ssh -F {lab.ssh_config}")
    for n in st.nodes:
        svc = " ".join(f"{k}={'up' if v else 'down'}" for k, v in n.services.items())
        power = f"on (init pid {n.init_pid})" if n.running else "off"
        print(f"  {n.name:<7} {n.address:<15} {power:<22} {svc}")
    c = st.cluster
    if c is None:
        print("  cluster: no node answers crm_mon")
        return
    print(
        f"  cluster: DC {c.dc or '-'}, {'quorate' if c.quorate else 'NOT quorate'}, online: {' '.join(c.online)}"
    )
    for r in c.resources:
        print(f"    {r.id:<20} {r.agent:<28} {r.role:<10} {' '.join(r.nodes)}")


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    cmd, args = a.command, list(a.args)

    def lab(n: int = DEFAULT_N) -> Lab:
        return Lab(
            a.prefix, n, state_dir=a.state_dir, crypto=a.crypto, fence_dummy=a.fence_dummy, log=_log
        )

    def node_arg() -> str:
        if not args:
            print(f"{cmd}: which node? (node1..node{MAX_NODES})", file=sys.stderr)
            raise SystemExit(2)
        return args[0] if args[0].startswith("node") else f"node{args[0]}"

    try:
        if cmd == "up":
            n = int(args[0]) if args else DEFAULT_N
            lb = lab(n)
            rep = lb.up()
            if rep.already_up:
                print(f"lab {lb.prefix} already up with {n} nodes")
            else:
                print(f"lab {lb.prefix} up with {n} nodes in {rep.total:.1f} s:\n{rep.render()}")
            _print_status(lb)
        elif cmd == "down":
            t = time.monotonic()
            done = lab().down(force="--force" in args)
            for d in done:
                print(f"  {d}")
            print(f"lab down in {time.monotonic() - t:.1f} s")
        elif cmd == "status":
            _print_status(lab())
        elif cmd == "exec":
            node = node_arg()
            if len(args) < 2:
                print("exec NODE CMD...", file=sys.stderr)
                return 2
            return lab().interactive(node, args[1:])
        elif cmd == "ssh":
            lb = lab()
            node = node_arg()
            lb.index(node)
            os.execvp("ssh", ["ssh", "-F", lb.ssh_config, node, *args[1:]])
        elif cmd in ("kill", "start", "stop", "netdown", "netup"):
            lb = lab()
            node = node_arg()
            t = time.monotonic()
            getattr(lb, cmd)(node)
            print(f"{cmd} {node}: done in {time.monotonic() - t:.2f} s")
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except PreflightError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 3
    except (LabError, ValueError) as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    return 0

"""``python -m playbooks``: argv and rendering only; the work is in the action modules.

    python -m playbooks deploy    --hosts node1,node2 --ini DTSetup.ini [--auth-key F]
    python -m playbooks cluster   --spec cluster.yaml
    python -m playbooks resources --spec cluster.yaml [--check] [--diff]
    python -m playbooks verify    --spec cluster.yaml | --hosts ...
    python -m playbooks upgrade   --spec cluster.yaml --ini DTSetup.ini [--allow-protocol-break]
    python -m playbooks validate  --spec cluster.yaml

Common: ``--ssh-config F`` (or ``--lab PREFIX`` for a lab/ cluster), ``--user``,
``-i KEY``, ``--forks N``, ``--timeout S`` (per host), ``--limit a,b|@retry``, ``--json``.
Exit codes (docs/playbooks.md): 0 ok, 1 invalid input (nothing ran), 2 a host failed,
4 a host was unreachable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from playbooks.recap import EXIT_SPEC, PlaybookResult
from playbooks.remote import Connector, expand_limit, fabric_connector
from playbooks.reports import Finding
from playbooks.spec import ClusterSpec, SpecError, load_spec

__all__ = ["main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", help="comma-separated host names (default: the spec's nodes)")
    p.add_argument("--spec", help="cluster spec YAML (schemas/cluster.schema.json)")
    p.add_argument("--ssh-config", help="ssh_config file (Host entries, ProxyCommand...)")
    p.add_argument("--lab", metavar="PREFIX", help="target a lab/ cluster: its ssh_config")
    p.add_argument("--user", help="ssh user (default: from ssh_config, else yours)")
    p.add_argument("-i", "--identity", help="ssh private key")
    p.add_argument("--forks", type=int, default=5, help="hosts in parallel (default 5)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per host (default 600)")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--limit", help="only these hosts: a,b or @RETRY_FILE")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.add_argument("-v", "--verbose", action="store_true", help="also list tasks that were ok")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m playbooks", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", help="install dtake on the hosts with dtsetup")
    _common(d)
    d.add_argument("--ini", required=True, help="DTSetup.ini (or .yaml)")
    d.add_argument("--wheelhouse", help="prebuilt wheelhouse (default: build one, cached)")
    d.add_argument(
        "--auth-key",
        help="cluster key file for dtake peers (default: <ini dir>/dtake-cluster.key, made once)",
    )
    d.add_argument("--python", default="/usr/bin/python3", help="python on the hosts")
    d.add_argument("--retry-file", help="failed hosts go here (default: <ini>.retry)")
    d.add_argument("--check", action="store_true")
    d.add_argument("--diff", action="store_true")
    for name, text in (
        ("cluster", "form or converge corosync/pacemaker from the spec"),
        ("resources", "converge resources and constraints from the spec (CIB diff)"),
        ("validate", "validate the spec only"),
    ):
        s = sub.add_parser(name, help=text)
        _common(s)
        if name != "validate":
            s.add_argument("--check", action="store_true")
            s.add_argument("--diff", action="store_true")
    v = sub.add_parser("verify", help="run the tests/infra suites against the hosts")
    _common(v)
    v.add_argument("--dtake-bin", default="/opt/dtake/venv/bin/dtake")
    v.add_argument("--no-cluster", action="store_true", help="node checks only")
    v.add_argument(
        "--no-multiplex",
        action="store_true",
        help="one ssh connection per command (default: one per host, ControlMaster)",
    )
    u = sub.add_parser("upgrade", help="rolling upgrade [L503-507]")
    _common(u)
    u.add_argument("--ini", required=True)
    u.add_argument("--wheelhouse")
    u.add_argument("--auth-key")
    u.add_argument("--python", default="/usr/bin/python3")
    u.add_argument(
        "--sync-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for upgraded targets to resync before moving (default 600)",
    )
    u.add_argument("--dtake-bin", default="/opt/dtake/venv/bin/dtake", help="dtake on the hosts")
    u.add_argument(
        "--allow-protocol-break",
        action="store_true",
        help="roll even if the running and new builds share no peer protocol version "
        "(replication between old and upgraded nodes pauses: docs/playbooks.md)",
    )
    return ap


def _ssh_config(args: argparse.Namespace) -> str | None:
    if args.ssh_config:
        return str(args.ssh_config)
    if args.lab:
        state = os.environ.get("DTAKE_LAB_STATE_DIR") or f"/run/dtake-lab-{args.lab}"
        return f"{state}/ssh/ssh_config"
    return None


def _lab_hosts(ssh_config: str) -> list[str]:
    for line in Path(ssh_config).read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] == "Host":
            return parts[1:]
    return []


def _connector(args: argparse.Namespace) -> Connector:
    return fabric_connector(
        ssh_config=_ssh_config(args),
        user=args.user,
        key_filename=args.identity,
        connect_timeout=args.connect_timeout,
        host_timeout=args.timeout,
    )


def _hosts(args: argparse.Namespace, spec: ClusterSpec | None) -> list[str]:
    if args.hosts:
        hosts = [h for h in args.hosts.split(",") if h]
    elif spec is not None:
        hosts = spec.node_names
    elif args.lab and _ssh_config(args):
        hosts = _lab_hosts(str(_ssh_config(args)))
    else:
        hosts = []
    return expand_limit(hosts, args.limit)


def _emit(result: PlaybookResult, args: argparse.Namespace) -> int:
    if args.json:
        print(result.to_json())
    else:
        print(result.render(verbose=args.verbose))
    return result.exit_code


def _fail(findings: list[Finding], args: argparse.Namespace, playbook: str) -> int:
    result = PlaybookResult(playbook, findings=findings)
    _emit(result, args)
    return EXIT_SPEC


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    spec: ClusterSpec | None = None
    if args.spec:
        try:
            spec = load_spec(args.spec)
        except SpecError as e:
            return _fail(e.findings, args, args.command)
    if args.command == "validate":
        if spec is None:
            return _fail([Finding("USAGE", "--spec is required")], args, "validate")
        print(f"{args.spec}: valid ({len(spec.nodes)} nodes, {len(spec.resources)} resources)")
        return 0
    if args.command in ("cluster", "resources") and spec is None:
        return _fail([Finding("USAGE", "--spec is required")], args, args.command)
    hosts = _hosts(args, spec)
    if not hosts:
        return _fail([Finding("USAGE", "no hosts: give --hosts or --spec")], args, args.command)

    if args.command in ("deploy", "upgrade"):
        from playbooks.deploy import DeployOptions, deploy
        from playbooks.wheelhouse import REPO, build_wheelhouse

        ini = Path(args.ini)
        if not ini.is_file():
            return _fail([Finding("USAGE", f"{ini}: no such file")], args, args.command)
        if args.wheelhouse:
            house = Path(args.wheelhouse)
        elif (REPO / "pyproject.toml").is_file():
            house = build_wheelhouse()[0]
        else:  # an installed playbooks package: no sources to build a wheelhouse from
            msg = "--wheelhouse DIR is required outside a checkout of the dtake repo"
            return _fail([Finding("USAGE", msg)], args, args.command)
        key = Path(args.auth_key) if args.auth_key else ini.parent / "dtake-cluster.key"
        ensure_key(key)
        o = DeployOptions(
            ini=ini,
            wheelhouse=house,
            auth_key=key,
            python=args.python,
            forks=args.forks,
            host_timeout=args.timeout,
        )
        if args.command == "deploy":
            o.check, o.diff = args.check, args.diff
            o.retry_file = Path(args.retry_file) if args.retry_file else ini.with_suffix(".retry")
            return _emit(deploy(hosts, _connector(args), o), args)
        from playbooks.upgrade import upgrade

        res = upgrade(
            hosts,
            _connector(args),
            o,
            sync_timeout=args.sync_timeout,
            dtake_bin=args.dtake_bin,
            allow_protocol_break=args.allow_protocol_break,
        )
        return _emit(res, args)
    if args.command == "cluster":
        from playbooks.cluster import ClusterOptions, cluster

        assert spec is not None
        co = ClusterOptions(check=args.check, diff=args.diff, forks=args.forks)
        return _emit(cluster(spec, _connector(args), co), args)
    if args.command == "resources":
        from playbooks.resources import ResourcesOptions, resources

        assert spec is not None
        ro = ResourcesOptions(check=args.check, diff=args.diff)
        return _emit(resources(spec, _connector(args), ro), args)
    if args.command == "verify":
        from playbooks.verify import VerifyOptions, verify

        vo = VerifyOptions(
            ssh_config=_ssh_config(args),
            identity=args.identity,
            dtake_bin=args.dtake_bin,
            cluster=not args.no_cluster,
            expect_nodes=spec.node_names if spec else hosts,
            forks=args.forks,
            multiplex=not args.no_multiplex,
        )
        return _emit(verify(hosts, vo), args)
    raise AssertionError(args.command)


def ensure_key(path: Path) -> None:
    """The dtake cluster key (64 lowercase hex + newline, 0600), made once and kept."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(32).hex() + "\n")


if __name__ == "__main__":
    sys.exit(main())

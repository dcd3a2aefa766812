"""``dtsetup`` command line: argv in, rendering out. The work is in ``dtsetup.actions``.

Exit codes (borg/Ansible style, docs/dtsetup.md): 0 nothing changed (or valid), 2 changed
(or, for plan and --check, would change), 1 failed (invalid input, a failed step, usage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from dtsetup import __version__
from dtsetup.reports import Code, Report, error
from dtsetup.silent import is_silent, parse_silent

if TYPE_CHECKING:
    from dtsetup import actions

# ``dtsetup.actions`` (every step, subprocess, the transaction machinery) is imported only
# by the commands that converge: --version, usage errors and validate start faster
# without it (bench/bench_dtsetup.py).

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_CHANGED = 0, 1, 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 1, not argparse's 2 (= "changed")
        raise _UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dtsetup",
        description="DTSetup.ini-compatible declarative installer for dtake.",
        epilog='Silent install as in the seed: dtsetup /s /v"DTSETUPINI=\\"/path/DTSetup.ini\\" /qn"',
    )
    p.add_argument("--version", action="version", version=f"dtsetup {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser, *, file: bool = True) -> None:
        if file:
            sp.add_argument("file", type=Path, help="DTSetup.ini or the same settings as YAML")
            sp.add_argument("--strict", action="store_true", help="Windows paths are errors")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    v = sub.add_parser("validate", help="check a DTSetup.ini/YAML file, report every problem")
    common(v)
    v.add_argument("--host", help="also resolve the section this host would use")

    for name, help_text in (
        ("plan", "show what apply would change"),
        ("apply", "converge this host"),
    ):
        sp = sub.add_parser(name, help=help_text)
        common(sp)
        sp.add_argument("--host", help="machine name (default: this host's name)")
        sp.add_argument("--root", type=Path, default=Path("/"), help="install into another root")
        if name == "apply":
            sp.add_argument("--check", action="store_true", help="plan only, change nothing")
            sp.add_argument("--diff", action="store_true", help="show diffs (secrets redacted)")
        sp.add_argument("--wheel", type=Path, help="the dtake wheel (deps beside it)")
        sp.add_argument("--wheelhouse", type=Path, help="directory of wheels (offline install)")
        sp.add_argument("--no-software", action="store_true", help="do not install the software")
        sp.add_argument("--agents-dir", type=Path, help="OCF agents to install")
        sp.add_argument(
            "--init",
            default="auto",
            choices=["auto", "systemd", "systemd-offline", "supervisor", "none"],
        )
        sp.add_argument(
            "--firewall", default="auto", choices=["auto", "firewalld", "ufw", "nftables", "none"]
        )
        sp.add_argument("--auth-key-file", type=Path, help="use this cluster key (64 hex chars)")

    u = sub.add_parser("uninstall", help="remove what apply installed")
    common(u, file=False)
    u.add_argument("--root", type=Path, default=Path("/"))
    u.add_argument("--check", action="store_true")

    e = sub.add_parser("export", help="the applied settings back as INI or YAML")
    e.add_argument("--root", type=Path, default=Path("/"))
    e.add_argument("--format", choices=["ini", "yaml"], default="ini")
    e.add_argument("--section", help="section name to write (default Config)")
    e.add_argument("--include-secrets", action="store_true", help="needs --output")
    e.add_argument("--output", type=Path, help="write here (mode 0600) instead of stdout")
    return p


def _print_reports(reports: Sequence[Report], out: TextIO) -> None:
    for report in reports:
        print(report.render(), file=out)


def _render_run(result: actions.RunResult, *, diff: bool, out: TextIO, err: TextIO) -> None:
    _print_reports(result.reports, err)
    for step in result.steps:
        line = f"{step.status}: [{result.host}] {step.name}"
        print(line + (f": {step.summary}" if step.summary else ""), file=out)
        if diff and step.diff and step.status != "ok":
            print(step.diff.rstrip("\n"), file=out)
    prefix = "PLAN RECAP" if result.check else "RECAP"
    print(f"{prefix} {result.recap()}", file=out)


def _json(data: Any, out: TextIO) -> None:
    print(json.dumps(data, indent=2, sort_keys=False), file=out)


def _options(args: argparse.Namespace, *, check: bool) -> actions.ApplyOptions:
    from dtsetup import actions

    return actions.ApplyOptions(
        host=args.host,
        root=args.root,
        check=check,
        strict=args.strict,
        wheel=args.wheel,
        wheelhouse=args.wheelhouse,
        no_software=args.no_software,
        agents_dir=args.agents_dir,
        init=args.init,
        firewall=args.firewall,
        auth_key_file=args.auth_key_file,
    )


def _silent(argv: Sequence[str], err: TextIO) -> int:
    path, problem = parse_silent(argv)
    if problem is not None or path is None:
        _print_reports([problem] if problem else [], err)
        return EXIT_FAILED
    from dtsetup import actions

    # /qn: no user interface; only errors are shown. The silent form takes no other
    # options (the seed forbids other words), so DTSETUP_ROOT / DTSETUP_HOST from the
    # environment stand in for --root / --host (image builds, tests).
    opts = actions.ApplyOptions(
        root=Path(os.environ.get("DTSETUP_ROOT") or "/"),
        host=os.environ.get("DTSETUP_HOST") or None,
    )
    result = actions.apply(path, opts)
    _print_reports([r for r in result.reports if r.is_error], err)
    for step in result.steps:
        if step.status == "failed":
            print(f"failed: {step.name}: {step.summary}", file=err)
    return result.exit_code


def run(argv: Sequence[str], out: TextIO, err: TextIO) -> int:
    if is_silent(argv):
        return _silent(argv, err)
    try:
        args = _parser().parse_args(list(argv))
    except _UsageError as exc:
        print(exc, file=err)
        return EXIT_FAILED
    if args.command == "validate":
        from dtsetup import model  # not actions: validate reads, it converges nothing

        loaded = model.load(args.file, host=args.host, strict=args.strict)
        if args.json:
            _json(
                {
                    "file": str(args.file),
                    "valid": loaded.ok,
                    "section": loaded.settings.section if loaded.settings else None,
                    "reports": [r.to_json() for r in loaded.reports],
                },
                out,
            )
        else:
            _print_reports(loaded.reports, err)
            if loaded.ok:
                chosen = (
                    f"; host {args.host} uses [{loaded.settings.section}]"
                    if loaded.settings
                    else ""
                )
                print(
                    f"{args.file}: valid ({len(loaded.document.sections)} sections){chosen}",
                    file=out,
                )
        return EXIT_OK if loaded.ok else EXIT_FAILED
    from dtsetup import actions

    if args.command in ("plan", "apply"):
        check = args.command == "plan" or args.check
        result = actions.apply(args.file, _options(args, check=check))
        diff = args.command == "plan" or args.diff
        if args.json:
            _json(result.to_json(with_diff=diff), out)
        else:
            _render_run(result, diff=diff, out=out, err=err)
        return result.exit_code
    if args.command == "uninstall":
        result = actions.uninstall(root=args.root, check=args.check)
        if args.json:
            _json(result.to_json(with_diff=False), out)
        else:
            _render_run(result, diff=False, out=out, err=err)
        return result.exit_code
    # export
    if args.include_secrets and args.output is None:
        _print_reports([error(Code.USAGE, "--include-secrets writes only to --output FILE")], err)
        return EXIT_FAILED
    exported = actions.export(
        root=args.root, fmt=args.format, section=args.section, include_secrets=args.include_secrets
    )
    _print_reports(exported.reports, err)
    if exported.text is None:
        return EXIT_FAILED
    if args.output is not None:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(exported.text)
    else:
        out.write(exported.text)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

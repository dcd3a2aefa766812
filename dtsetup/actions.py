"""One function per user action: validate, plan, apply, uninstall, export.

Actions return structured results (never print, never exit); ``dtsetup.cli`` renders them.
Apply plans every step first (reading only), stops before touching anything if a plan
fails, then applies the changed steps inside one transaction: a failure rolls back every
change already made, so the host is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtsetup import model, paths, render
from dtsetup.reports import Code, Report, Severity, error, has_errors, warning
from dtsetup.runner import Runner, SubprocessRunner
from dtsetup.steps.agents import AgentsStep, default_agents_dir
from dtsetup.steps.base import Change, Context, Step, StepError
from dtsetup.steps.files import ConfigStep, FoldersStep, RecordStep
from dtsetup.steps.firewall import BACKENDS, FirewallStep, detect_backend
from dtsetup.steps.groups import GroupsStep, prefix_args
from dtsetup.steps.key import AuthKeyStep
from dtsetup.steps.service import ServiceStep, detect_init
from dtsetup.steps.software import SoftwareSource, SoftwareStep
from dtsetup.txn import Transaction, read_bytes

__all__ = [
    "ApplyOptions",
    "RunResult",
    "StepResult",
    "apply",
    "export",
    "read_record",
    "uninstall",
    "validate",
]

OK, CHANGED, FAILED, SKIPPED, ROLLED_BACK = "ok", "changed", "failed", "skipped", "rolled_back"


@dataclass(frozen=True, slots=True)
class StepResult:
    name: str
    status: str  # ok | changed | failed | skipped | rolled_back
    summary: str = ""
    diff: str = ""

    def to_json(self, *, with_diff: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "status": self.status, "summary": self.summary}
        if with_diff:
            data["diff"] = self.diff
        return data


@dataclass
class RunResult:
    """The outcome of apply/plan/uninstall on one host (the Ansible PLAY RECAP's data)."""

    action: str
    host: str
    section: str | None = None
    check: bool = False
    steps: list[StepResult] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for s in self.steps if s.status == status)

    @property
    def failed(self) -> bool:
        return self.count(FAILED) > 0 or has_errors(self.reports)

    @property
    def changed(self) -> bool:
        return self.count(CHANGED) > 0

    @property
    def exit_code(self) -> int:
        """0 nothing changed, 2 changed (or would change, in check mode), 1 failed."""
        if self.failed:
            return 1
        return 2 if self.changed else 0

    def recap(self) -> str:
        failed = self.count(FAILED) or (1 if has_errors(self.reports) else 0)
        text = f"{self.host}: ok={self.count(OK)} changed={self.count(CHANGED)} failed={failed}"
        extra = [f"{s}={self.count(s)}" for s in (SKIPPED, ROLLED_BACK) if self.count(s)]
        return " ".join([text, *extra])

    def to_json(self, *, with_diff: bool) -> dict[str, Any]:
        return {
            "action": self.action,
            "host": self.host,
            "section": self.section,
            "check": self.check,
            "exit_code": self.exit_code,
            "recap": {
                "ok": self.count(OK),
                "changed": self.count(CHANGED),
                "failed": self.count(FAILED) or (1 if has_errors(self.reports) else 0),
                "skipped": self.count(SKIPPED),
                "rolled_back": self.count(ROLLED_BACK),
            },
            "steps": [s.to_json(with_diff=with_diff) for s in self.steps],
            "reports": [r.to_json() for r in self.reports],
        }


@dataclass(frozen=True, kw_only=True)
class ApplyOptions:
    """How to converge. ``None`` fields mean "work it out": host = this machine's name;
    software = ``--wheel``/``--wheelhouse``, else a ``wheelhouse/`` beside the input file
    (the seed runs setup from the directory holding the install files [L684]);
    agents = the ``resource_agents/`` shipped beside the dtsetup package."""

    host: str | None = None
    root: Path = Path("/")
    check: bool = False
    strict: bool = False
    wheel: Path | None = None
    wheelhouse: Path | None = None
    no_software: bool = False
    agents_dir: Path | None = None
    init: str = "auto"  # auto | systemd | systemd-offline | supervisor | none
    firewall: str = "auto"  # auto | firewalld | ufw | nftables | none
    auth_key_file: Path | None = None
    runner: Runner | None = None
    # Test seam: wraps the step list (e.g. to inject a failure midway).
    steps_hook: Callable[[list[Step]], list[Step]] | None = None


def validate(path: Path, *, strict: bool = False, host: str | None = None) -> model.LoadResult:
    return model.load(path, host=host, strict=strict)


def read_record(root: Path) -> tuple[dict[str, Any] | None, list[Report]]:
    data = read_bytes(paths.under(root, paths.RECORD))
    if data is None:
        return None, []
    try:
        record = json.loads(data)
        if not isinstance(record, dict):
            raise ValueError("not an object")
        return record, []
    except ValueError as exc:
        return None, [
            warning(Code.RECORD_UNREADABLE, f"ignoring unreadable record: {exc}", file=paths.RECORD)
        ]


def _software_source(path: Path, opts: ApplyOptions) -> SoftwareSource | None:
    if opts.wheel is not None or opts.wheelhouse is not None:
        return SoftwareSource(wheel=opts.wheel, wheelhouse=opts.wheelhouse)
    beside = path.resolve().parent / "wheelhouse"
    return SoftwareSource(wheelhouse=beside) if beside.is_dir() else None


def _firewall_step(opts: ApplyOptions, runner: Runner, live: bool) -> FirewallStep:
    if opts.firewall == "none":
        return FirewallStep(backend=None, reason="--firewall none")
    if opts.firewall in BACKENDS:
        return FirewallStep(backend=opts.firewall)
    if not live:
        return FirewallStep(
            backend=None,
            reason="offline root: this machine's firewall is left alone (--firewall BACKEND changes it)",
        )
    return FirewallStep(backend=detect_backend(runner), required=True)


def build_steps(path: Path, opts: ApplyOptions, runner: Runner, live: bool) -> list[Step]:
    steps: list[Step] = [FoldersStep()]
    if not opts.no_software:
        steps.append(SoftwareStep(_software_source(path, opts)))
    steps += [
        GroupsStep(),
        ConfigStep(),
        AuthKeyStep(provided=opts.auth_key_file),
        AgentsStep(opts.agents_dir or default_agents_dir()),
        ServiceStep(),
        _firewall_step(opts, runner, live),
    ]
    if opts.steps_hook is not None:
        steps = opts.steps_hook(steps)
    return steps


def _server_only(step: Step, settings: model.Settings) -> bool:
    return not settings.server and step.name in {"groups", "config", "authkey", "agents"}


def apply(path: Path, opts: ApplyOptions) -> RunResult:
    """Plan (``opts.check``) or converge this host from the DTSetup file at ``path``."""
    host = opts.host or socket.gethostname()
    result = RunResult(action="plan" if opts.check else "apply", host=host, check=opts.check)
    loaded = model.load(path, host=host, strict=opts.strict)
    result.reports.extend(loaded.reports)
    if not loaded.ok or loaded.settings is None:
        return result  # invalid input: nothing is changed
    settings = loaded.settings
    result.section = settings.section
    root = opts.root.resolve()
    live = root == Path("/")
    if live and not opts.check and os.geteuid() != 0:
        result.reports.append(error(Code.NOT_ROOT, "apply to / needs root (or use --root DIR)"))
        return result
    previous, record_reports = read_record(root)
    result.reports.extend(record_reports)
    runner = opts.runner or SubprocessRunner()
    ctx = Context(
        root=root,
        settings=settings,
        runner=runner,
        previous=previous,
        init=detect_init(root, requested=opts.init),
    )
    steps = [s for s in build_steps(path, opts, runner, live) if not _server_only(s, settings)]
    steps.append(RecordStep(list(steps)))
    return _run(ctx, steps, result)


def _run(ctx: Context, steps: list[Step], result: RunResult) -> RunResult:
    plans: list[Change] = []
    for step in steps:
        try:
            change = step.plan(ctx)
        except (StepError, OSError) as exc:
            code = exc.code if isinstance(exc, StepError) else Code.STEP_FAILED
            result.steps.append(StepResult(step.name, FAILED, str(exc)))
            result.reports.append(error(Code(code), str(exc), key=step.name))
            continue
        plans.append(change)
        if change.changed:
            ctx.pending.add(step.name)
        status = SKIPPED if change.skipped else (CHANGED if change.changed else OK)
        result.steps.append(StepResult(step.name, status, change.summary, change.diff))
    if result.failed or result.check:
        return result  # a plan failed: apply nothing; or check mode: plan only
    txn = Transaction()
    for index, step in enumerate(steps):
        planned = result.steps[index]
        if planned.status != CHANGED and step.name != "record":
            continue
        try:
            step.apply(ctx, txn)
        except Exception as exc:
            problems = txn.rollback()
            result.steps[index] = StepResult(step.name, FAILED, str(exc), planned.diff)
            result.reports.append(error(Code.STEP_FAILED, str(exc), key=step.name))
            for p in problems:
                result.reports.append(error(Code.ROLLBACK_FAILED, p, key=step.name))
            for j in range(index):
                if result.steps[j].status == CHANGED:
                    prev = result.steps[j]
                    result.steps[j] = StepResult(prev.name, ROLLED_BACK, prev.summary, prev.diff)
            for j in range(index + 1, len(steps)):
                if result.steps[j].status == CHANGED:
                    nxt = result.steps[j]
                    result.steps[j] = StepResult(nxt.name, SKIPPED, nxt.summary, nxt.diff)
            return result
    txn.commit()
    return result


# -- uninstall ---------------------------------------------------------------------------


def _settings_from_record(record: dict[str, Any]) -> model.Settings:
    keys = dict(model.DEFAULTS) | dict(record.get("settings") or {})
    disk_max = keys["DISKQUEUEMAXSIZE"]
    return model.Settings(
        section=str(record.get("section") or "Config"),
        setup_type=keys["DTSETUPTYPE"],
        activation_codes=tuple(keys.get("DTACTIVATIONCODE") or ()),
        install_folder=keys["DOUBLETAKEFOLDER"],
        memory_buffer_max_mb=keys["QMEMORYBUFFERMAX"],
        disk_queue_folder=keys["DISKQUEUEFOLDER"],
        disk_queue_max_mb=None if disk_max == "UNLIMITED" else int(disk_max),
        disk_free_min_mb=keys["DISKFREESPACEMIN"],
        service_startup=bool(keys["DTSERVICESTARTUP"]),
        port=int(keys["PORT"]),
        set_fw_port=bool(keys["SET_FWPORT"]),
    )


class _UninstallStep:
    """Removes everything a record lists; plan says what, apply does it through the txn."""

    def __init__(
        self,
        name: str,
        plan: Callable[[Context], list[str]],
        act: Callable[[Context, Transaction], None],
    ):
        self.name = name
        self._plan = plan
        self._act = act

    def plan(self, ctx: Context) -> Change:
        todo = self._plan(ctx)
        return Change(changed=bool(todo), summary="; ".join(todo))

    def apply(self, ctx: Context, txn: Transaction) -> None:
        self._act(ctx, txn)

    def installed(self, ctx: Context) -> dict[str, Any]:
        return {}


def _uninstall_steps(record: dict[str, Any], python: str | None = None) -> list[Step]:
    installed = record.get("installed") or {}
    init = installed.get("init", "none")
    service = ServiceStep() if python is None else ServiceStep(python=python)

    def stop_plan(ctx: Context) -> list[str]:
        if init == "systemd":
            return ["systemctl disable --now dtake"]
        if init == "supervisor" and service._supervisor_running(ctx):
            return ["stop dtake (supervisor)"]
        return []

    def stop_act(ctx: Context, txn: Transaction) -> None:
        if init == "systemd":
            ctx.runner.run(["systemctl", "disable", "--now", paths.UNIT_NAME], check=True)
            txn.on_undo("systemctl enable --now", lambda: _enable_now(ctx))
        elif init == "supervisor":
            ctx.runner.run(service.supervisor_argv(ctx, "stop"), check=True)

    firewall = installed.get("firewall") or None

    def fw_plan(ctx: Context) -> list[str]:
        if firewall and firewall.get("backend") in BACKENDS:
            backend = BACKENDS[firewall["backend"]]
            if backend.present(ctx.runner, int(firewall["port"])):
                return [f"close {firewall['port']}/tcp+udp ({backend.name})"]
        return []

    def fw_act(ctx: Context, txn: Transaction) -> None:
        assert firewall is not None
        backend, port = BACKENDS[firewall["backend"]], int(firewall["port"])
        backend.remove(ctx.runner, port)
        txn.on_undo(f"reopen {port}", lambda: backend.add(ctx.runner, port))

    files = sorted(set(installed.get("files") or ()) | set(installed.get("agents") or ()))
    files = [f for f in files if f != paths.RECORD] + [paths.RECORD]  # the record goes last

    def files_plan(ctx: Context) -> list[str]:
        present = [f for f in files if ctx.host(f).exists() or ctx.host(f).is_symlink()]
        trees = [t for t in installed.get("trees") or () if ctx.host(t).exists()]
        return [f"remove {f}" for f in [*trees, *present]]

    def files_act(ctx: Context, txn: Transaction) -> None:
        for tree in installed.get("trees") or ():
            txn.move_aside(ctx.host(tree))
        for f in files:
            txn.remove_file(ctx.host(f))
        if init == "systemd":
            ctx.runner.run(["systemctl", "daemon-reload"], check=True)

    groups = list(installed.get("groups") or ())

    def groups_plan(ctx: Context) -> list[str]:
        from dtsetup.steps.groups import group_names

        existing = group_names(ctx)
        return [f"groupdel {g}" for g in groups if g in existing]

    def groups_act(ctx: Context, txn: Transaction) -> None:
        for todo in groups_plan(ctx):
            group = todo.split()[-1]
            ctx.runner.run(["groupdel", *prefix_args(ctx), group], check=True)
            txn.on_undo(f"groupadd {group}", _group_adder(ctx, group))

    dirs = sorted(installed.get("dirs") or (), key=lambda d: (-d.count("/"), d))

    def dirs_plan(ctx: Context) -> list[str]:
        return [f"rmdir {d}" for d in dirs if ctx.host(d).is_dir()]

    def dirs_act(ctx: Context, txn: Transaction) -> None:
        for d in dirs:
            txn.remove_dir_if_empty(ctx.host(d))  # never removes what others put there

    return [
        _UninstallStep("service", stop_plan, stop_act),
        _UninstallStep("firewall", fw_plan, fw_act),
        _UninstallStep("files", files_plan, files_act),
        _UninstallStep("groups", groups_plan, groups_act),
        _UninstallStep("folders", dirs_plan, dirs_act),
    ]


def _enable_now(ctx: Context) -> None:
    ctx.runner.run(["systemctl", "enable", "--now", paths.UNIT_NAME], check=True)


def _group_adder(ctx: Context, group: str) -> Callable[[], None]:
    def add() -> None:
        ctx.runner.run(["groupadd", "--system", *prefix_args(ctx), group], check=True)

    return add


def uninstall(
    *,
    root: Path = Path("/"),
    check: bool = False,
    host: str | None = None,
    runner: Runner | None = None,
    python: str | None = None,
) -> RunResult:
    """Remove what the record says apply installed (and only that)."""
    result = RunResult(action="uninstall", host=host or socket.gethostname(), check=check)
    root = root.resolve()
    record, reports = read_record(root)
    result.reports.extend(reports)
    if record is None:
        result.reports.append(
            Report(Code.NOT_INSTALLED, f"no {paths.RECORD}: nothing to uninstall", Severity.INFO)
        )
        return result
    if root == Path("/") and not check and os.geteuid() != 0:
        result.reports.append(
            error(Code.NOT_ROOT, "uninstall from / needs root (or use --root DIR)")
        )
        return result
    ctx = Context(
        root=root,
        settings=_settings_from_record(record),
        runner=runner or SubprocessRunner(),
        previous=record,
    )
    result.section = ctx.settings.section
    _run(ctx, _uninstall_steps(record, python), result)
    if not result.failed and not check:
        # Trees moved aside are deleted at commit, which can empty more recorded folders.
        for d in sorted(_recorded_dirs(record), key=lambda d: (-d.count("/"), d)):
            with contextlib.suppress(OSError):
                ctx.host(d).rmdir()
    return result


def _recorded_dirs(record: dict[str, Any]) -> list[str]:
    return list((record.get("installed") or {}).get("dirs") or ())


# -- export ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportResult:
    text: str | None
    reports: list[Report]


def export(
    *,
    root: Path = Path("/"),
    fmt: str = "ini",
    section: str | None = None,
    include_secrets: bool = False,
) -> ExportResult:
    """The applied settings back in input form (INI or YAML); activation codes are left
    out unless ``include_secrets``."""
    record, reports = read_record(root)
    if record is None:
        return ExportResult(
            None, [*reports, error(Code.NOT_INSTALLED, f"no {paths.RECORD}: nothing applied here")]
        )
    keys = dict(record.get("settings") or {})
    name = section or "Config"
    renderer = render.export_yaml if fmt == "yaml" else render.export_ini
    return ExportResult(renderer(name, keys, include_secrets=include_secrets), reports)

"""The service: a systemd unit (Type=notify) or, where systemd is not PID 1, the
dtake-supervisor with a pidfile. DTSERVICESTARTUP=Y enables and starts it; N installs it
disabled and leaves a running service alone (``systemctl disable`` does not stop either)
[seed L660-664]. A change to the software, config or key restarts a running service."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from dtsetup import paths
from dtsetup.steps.base import Change, Context, ManagedFile, file_changes, write_files
from dtsetup.txn import Transaction, read_bytes

__all__ = ["ServiceStep", "detect_init", "unit_text"]

RESTART_ON = frozenset({"software", "config", "authkey"})
SUPERVISOR_SCRIPT = "libexec/dtake-supervisor"


def detect_init(root: Path, *, requested: str = "auto") -> str:
    """``auto``: systemd when it is PID 1 here (sd_booted: /run/systemd/system exists) and
    we install into /; a unit file with enablement links only (as ``systemctl --root``)
    for another root; the supervisor otherwise."""
    if requested != "auto":
        return requested
    if root != Path("/"):
        return "systemd-offline"
    return "systemd" if Path(paths.SYSTEMD_RUNNING_MARK).is_dir() else "supervisor"


def exec_start(folder: str) -> list[str]:
    return [f"{folder.rstrip('/')}/venv/bin/dtake", "serve", "--config", paths.SERVICE_CONFIG]


def unit_text(folder: str) -> str:
    return (
        "# Managed by dtsetup: changes here are overwritten by the next `dtsetup apply`.\n"
        "[Unit]\n"
        "Description=dtake replication service\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "# Pacemaker must find the service up before it probes the dtake resources.\n"
        "Before=pacemaker.service\n"
        "\n"
        "[Service]\n"
        "Type=notify\n"
        f"ExecStart={' '.join(exec_start(folder))}\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "RuntimeDirectory=dtake\n"
        "RuntimeDirectoryMode=0755\n"
        "KillMode=mixed\n"
        "TimeoutStopSec=90\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


class ServiceStep:
    name = "service"

    def __init__(self, *, python: str = sys.executable) -> None:
        self.python = python

    # -- what we manage per init ---------------------------------------------------------
    def _files(self, ctx: Context) -> list[ManagedFile]:
        folder = ctx.settings.install_folder
        if ctx.init in ("systemd", "systemd-offline"):
            return [ManagedFile(paths.SYSTEMD_UNIT, unit_text(folder).encode(), 0o644)]
        if ctx.init == "supervisor":
            script = Path(__file__).resolve().parent.parent / "supervisor.py"
            defaults = (
                "# Managed by dtsetup. Read by the lab's boot scripts: start dtake at boot?\n"
                f"DTAKE_AUTOSTART={'yes' if ctx.settings.service_startup else 'no'}\n"
                f"DTAKE_PIDFILE={paths.PIDFILE}\n"
                f'DTAKE_EXEC="{" ".join(exec_start(folder))}"\n'
            )
            return [
                ManagedFile(self.script_path(ctx), script.read_bytes(), 0o755),
                ManagedFile(paths.SUPERVISOR_DEFAULTS, defaults.encode(), 0o644),
            ]
        return []

    def script_path(self, ctx: Context) -> str:
        return f"{ctx.settings.install_folder.rstrip('/')}/{SUPERVISOR_SCRIPT}"

    def _active(self, ctx: Context) -> bool:
        return ctx.init != "none" and ctx.settings.server

    # -- state queries -------------------------------------------------------------------
    def _systemctl(self, ctx: Context, *args: str, check: bool = False) -> bool:
        return ctx.runner.run(["systemctl", *args, paths.UNIT_NAME], check=check).ok

    def _wants_link_ok(self, ctx: Context) -> bool:
        link = ctx.host(paths.SYSTEMD_WANTS)
        if ctx.settings.service_startup:
            return link.is_symlink() and os.readlink(link) == paths.SYSTEMD_UNIT
        return not (link.is_symlink() or link.exists())

    def supervisor_argv(self, ctx: Context, action: str) -> list[str]:
        argv = [
            self.python,
            str(ctx.host(self.script_path(ctx))),
            action,
            "--pidfile",
            str(ctx.host(paths.PIDFILE)),
        ]
        if action in ("start", "restart"):
            # Under --root the supervisor still runs on this machine: rooted paths.
            folder = ctx.settings.install_folder.rstrip("/")
            argv += ["--log", str(ctx.host(paths.SUPERVISOR_LOG)), "--notify", "--"]
            argv += [str(ctx.host(f"{folder}/venv/bin/dtake")), "serve", "--config"]
            argv += [str(ctx.host(paths.SERVICE_CONFIG))]
        return argv

    def _supervisor_running(self, ctx: Context) -> bool:
        from dtsetup.supervisor import read_pid

        return read_pid(ctx.host(paths.PIDFILE)) is not None

    # -- plan / apply --------------------------------------------------------------------
    def _actions(self, ctx: Context) -> list[str]:
        if not self._active(ctx):
            return []
        s = ctx.settings
        restart = bool(ctx.pending & RESTART_ON)
        actions: list[str] = []
        if ctx.init == "systemd-offline":
            if not self._wants_link_ok(ctx):
                actions.append("enable" if s.service_startup else "disable")
        elif ctx.init == "systemd":
            enabled = self._systemctl(ctx, "is-enabled", "--quiet")
            running = self._systemctl(ctx, "is-active", "--quiet")
            if s.service_startup and not enabled:
                actions.append("enable")
            if not s.service_startup and enabled:
                actions.append("disable")
            if s.service_startup and not running:
                actions.append("start")
            elif running and restart:
                actions.append("restart")
        elif ctx.init == "supervisor":
            running = self._supervisor_running(ctx)
            if s.service_startup and not running:
                actions.append("start")
            elif running and restart:
                actions.append("restart")
        return actions

    def plan(self, ctx: Context) -> Change:
        if not self._active(ctx):
            return Change(changed=False, skipped=True, summary="no service (DTCO or --init none)")
        files = file_changes(ctx, self._files(ctx))
        actions = self._actions(ctx)
        summary = "; ".join(
            x for x in [files.summary, *(f"{a} dtake ({ctx.init})" for a in actions)] if x
        )
        return Change(changed=files.changed or bool(actions), summary=summary, diff=files.diff)

    def apply(self, ctx: Context, txn: Transaction) -> None:
        if not self._active(ctx):
            return
        unit_before = read_bytes(ctx.host(paths.SYSTEMD_UNIT))
        actions = self._actions(ctx)
        write_files(ctx, txn, self._files(ctx))
        if ctx.init == "systemd-offline":
            if "enable" in actions:
                txn.symlink(ctx.host(paths.SYSTEMD_WANTS), paths.SYSTEMD_UNIT)
            if "disable" in actions:
                txn.remove_file(ctx.host(paths.SYSTEMD_WANTS))
            return
        if ctx.init == "systemd":
            if read_bytes(ctx.host(paths.SYSTEMD_UNIT)) != unit_before:
                ctx.runner.run(["systemctl", "daemon-reload"], check=True)
                txn.on_undo("daemon-reload", lambda: self._reload(ctx))
            undo = {"enable": "disable", "disable": "enable", "start": "stop", "restart": "restart"}
            for action in actions:
                self._systemctl(ctx, action, check=True)
                txn.on_undo(f"systemctl {undo[action]}", self._undoer(ctx, undo[action]))
            return
        for action in actions:  # supervisor
            # The supervisor creates its log, the service its control socket: a rollback
            # removes them again (LIFO: after the supervisor is stopped), so their
            # folders can go too. systemd's RuntimeDirectory= does this for the unit.
            txn.expect_file(ctx.host(paths.SUPERVISOR_LOG))
            txn.expect_file(ctx.host(paths.CONTROL_SOCKET))
            ctx.runner.run(self.supervisor_argv(ctx, action), check=True)
            back = "stop" if action == "start" else "restart"
            txn.on_undo(f"supervisor {back}", self._supervisor_undoer(ctx, back))

    def _reload(self, ctx: Context) -> None:
        ctx.runner.run(["systemctl", "daemon-reload"], check=True)

    def _undoer(self, ctx: Context, action: str) -> Any:
        return lambda: self._systemctl(ctx, action, check=True) and None

    def _supervisor_undoer(self, ctx: Context, action: str) -> Any:
        return lambda: ctx.runner.run(self.supervisor_argv(ctx, action), check=True) and None

    def installed(self, ctx: Context) -> dict[str, Any]:
        if not self._active(ctx):
            return {"init": "none"}
        files = [f.path for f in self._files(ctx)]
        if ctx.init == "systemd-offline" and ctx.settings.service_startup:
            files.append(paths.SYSTEMD_WANTS)
        if ctx.init == "supervisor":
            # Left by the supervisor and by the service (which does not unlink its control
            # socket on exit): uninstall removes them, as systemd's RuntimeDirectory= would.
            files += [paths.SUPERVISOR_LOG, paths.CONTROL_SOCKET]
        return {"init": ctx.init, "files": files}

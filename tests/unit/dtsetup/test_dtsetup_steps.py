"""Steps against a scripted runner: firewall backends, systemd, software, groups, rollback."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dtsetup import actions, model
from dtsetup.runner import Completed, ScriptedRunner
from dtsetup.steps.base import Context
from dtsetup.steps.firewall import FirewallStep, Nftables, detect_backend
from dtsetup.steps.service import ServiceStep
from dtsetup.steps.software import SoftwareSource, SoftwareStep
from dtsetup.txn import Transaction


def settings(path: Path) -> model.Settings:
    result = model.load(path, host="h")
    assert result.settings is not None, result.reports
    return result.settings


def ctx_for(tmp_path: Path, s: model.Settings, runner: ScriptedRunner, **kw: object) -> Context:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    return Context(root=root, settings=s, runner=runner, previous=kw.pop("previous", None), **kw)  # type: ignore[arg-type]


class FakeNft:
    """nft as a state machine: the table exists after nft -f, until delete."""

    def __init__(self) -> None:
        self.table: str | None = None

    def install(self, runner: ScriptedRunner) -> None:
        runner.on("nft", "list", "table", "inet", "dtake", answer=self.listing)
        runner.on("nft", "-f", "-", answer=self.load)
        runner.on("nft", "delete", "table", "inet", "dtake", answer=self.delete)

    def listing(self, argv: tuple[str, ...], input: str | None) -> Completed:
        if self.table is None:
            return Completed(argv, 1, "", "No such file or directory")
        return Completed(argv, 0, self.table)

    def load(self, argv: tuple[str, ...], input: str | None) -> Completed:
        assert input is not None and "delete table inet dtake" in input
        self.table = input.split("delete table inet dtake\n", 1)[1]
        return Completed(argv, 0)

    def delete(self, argv: tuple[str, ...], input: str | None) -> Completed:
        self.table = None
        return Completed(argv, 0)


def test_nftables_converges_and_port_change(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    runner, nft = ScriptedRunner(), FakeNft()
    nft.install(runner)
    ctx = ctx_for(tmp_path, settings(full_ini()), runner)
    step = FirewallStep(backend="nftables")
    change = step.plan(ctx)
    assert change.changed and "add 6320" in change.summary
    step.apply(ctx, Transaction())
    assert nft.table is not None and "tcp dport 6320 accept" in nft.table
    assert not FirewallStep(backend="nftables").plan(ctx).changed
    # the port moves: the old rule goes, the new one comes
    ctx2 = ctx_for(
        tmp_path,
        settings(full_ini(PORT="7000")),
        runner,
        previous={"installed": step.installed(ctx)},
    )
    step2 = FirewallStep(backend="nftables")
    assert step2.plan(ctx2).summary == "remove 6320/tcp+udp (nftables); add 7000/tcp+udp (nftables)"
    txn = Transaction()
    step2.apply(ctx2, txn)
    assert "dport 7000" in nft.table and "dport 6320" not in nft.table
    txn.rollback()  # undo reopens 6320
    assert "dport 6320" in (nft.table or "")
    assert runner.unexpected == []


def test_nftables_ruleset_is_one_transaction() -> None:
    text = Nftables().ruleset(6320)
    assert text.startswith("table inet dtake\ndelete table inet dtake\n")
    assert "hook input priority filter; policy accept;" in text


def test_set_fwport_n_removes_our_rule(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    runner, nft = ScriptedRunner(), FakeNft()
    nft.install(runner)
    nft.table = "tcp dport 6320 accept\nudp dport 6320 accept\n"
    previous = {"installed": {"firewall": {"backend": "nftables", "port": 6320}}}
    ctx = ctx_for(tmp_path, settings(full_ini(SET_FWPORT="N")), runner, previous=previous)
    step = FirewallStep(backend="nftables")
    assert step.plan(ctx).summary == "remove 6320/tcp+udp (nftables)"
    step.apply(ctx, Transaction())
    assert nft.table is None


def test_firewalld_and_ufw_commands(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    runner = (
        ScriptedRunner()
        .on("firewall-cmd", answer=0)
        .on("firewall-cmd", "--query-port=6320/tcp", answer=1)
    )
    ctx = ctx_for(tmp_path, settings(full_ini()), runner)
    step = FirewallStep(backend="firewalld")
    assert step.plan(ctx).changed
    step.apply(ctx, Transaction())
    assert (
        "firewall-cmd",
        "--permanent",
        "--add-port=6320/tcp",
        "--add-port=6320/udp",
    ) in runner.calls
    assert ("firewall-cmd", "--add-port=6320/tcp", "--add-port=6320/udp") in runner.calls

    ufw = ScriptedRunner().on(
        "ufw", "status", answer=(0, "Status: active\n6320/tcp ALLOW Anywhere\n")
    )
    ufw.on("ufw", "allow", answer=0)
    ctx = ctx_for(tmp_path, settings(full_ini()), ufw)
    step = FirewallStep(backend="ufw")
    assert step.plan(ctx).changed  # udp missing
    step.apply(ctx, Transaction())
    assert ("ufw", "allow", "6320/udp", "comment", "dtake") in ufw.calls


def test_backend_detection_order() -> None:
    fwd = ScriptedRunner(programs={"firewall-cmd", "ufw", "nft"}).on(
        "firewall-cmd", "--state", answer=0
    )
    assert detect_backend(fwd) == "firewalld"
    ufw = ScriptedRunner(programs={"ufw", "nft"}).on(
        "ufw", "status", answer=(0, "Status: active\n")
    )
    assert detect_backend(ufw) == "ufw"
    inactive = ScriptedRunner(programs={"ufw", "nft"}).on(
        "ufw", "status", answer=(0, "Status: inactive\n")
    )
    assert detect_backend(inactive) == "nftables"
    assert detect_backend(ScriptedRunner()) is None


def test_no_backend_live_is_a_plan_error(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    from dtsetup.steps.base import StepError

    ctx = ctx_for(tmp_path, settings(full_ini()), ScriptedRunner())
    with pytest.raises(StepError) as exc:
        FirewallStep(backend=None, required=True).plan(ctx)
    assert exc.value.code == "NO_FIREWALL_BACKEND"
    assert FirewallStep(backend=None).plan(ctx).skipped


def test_systemd_live_enable_start_and_restart(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    state = {"enabled": False, "active": False}

    def query(name: str) -> Callable[[tuple[str, ...], str | None], int]:
        return lambda argv, _input: 0 if state[name] else 3

    def setter(name: str, value: bool) -> Callable[[tuple[str, ...], str | None], int]:
        def set_(argv: tuple[str, ...], _input: str | None) -> int:
            state[name] = value
            return 0

        return set_

    runner = ScriptedRunner()
    runner.on("systemctl", "is-enabled", answer=query("enabled"))
    runner.on("systemctl", "is-active", answer=query("active"))
    runner.on("systemctl", "enable", answer=setter("enabled", True))
    runner.on("systemctl", "start", answer=setter("active", True))
    runner.on("systemctl", "daemon-reload", answer=0)
    runner.on("systemctl", "restart", answer=0)
    ctx = ctx_for(tmp_path, settings(full_ini()), runner, init="systemd")
    step = ServiceStep()
    change = step.plan(ctx)
    assert "enable dtake (systemd)" in change.summary and "start dtake (systemd)" in change.summary
    step.apply(ctx, Transaction())
    unit = (ctx.root / "etc/systemd/system/dtake.service").read_text()
    assert "Type=notify" in unit
    assert "ExecStart=/opt/dtake/venv/bin/dtake serve --config /etc/dtake/dtake.yaml" in unit
    assert runner.ran("systemctl", "daemon-reload")
    assert not ServiceStep().plan(ctx).changed
    ctx.pending.add("config")
    assert ServiceStep().plan(ctx).summary == "restart dtake (systemd)"
    assert runner.unexpected == []


def test_service_startup_n_disables_without_stopping(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    runner = (
        ScriptedRunner()
        .on("systemctl", "is-enabled", answer=0)
        .on("systemctl", "is-active", answer=0)
    )
    ctx = ctx_for(tmp_path, settings(full_ini(DTSERVICESTARTUP="N")), runner, init="systemd")
    summary = ServiceStep().plan(ctx).summary
    assert "disable dtake" in summary and "stop" not in summary


def test_offline_root_enablement_link(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    ctx = ctx_for(tmp_path, settings(full_ini()), ScriptedRunner(), init="systemd-offline")
    ServiceStep().apply(ctx, Transaction())
    link = ctx.root / "etc/systemd/system/multi-user.target.wants/dtake.service"
    assert os.readlink(link) == "/etc/systemd/system/dtake.service"
    off = ctx_for(
        tmp_path, settings(full_ini(DTSERVICESTARTUP="0")), ScriptedRunner(), init="systemd-offline"
    )
    assert ServiceStep().plan(off).summary == "disable dtake (systemd-offline)"


def _software_from_wheelhouse(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> tuple[Context, ScriptedRunner, Path, SoftwareStep]:
    """A wheelhouse of one (fake) dtake wheel and a runner whose venv and pip succeed."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "dtake-0.1.0-py3-none-any.whl").write_bytes(b"wheel one")

    def make_venv(argv: tuple[str, ...], _input: str | None) -> int:
        (Path(argv[-1]) / "bin").mkdir(parents=True)
        (Path(argv[-1]) / "bin" / "python").write_text("")
        return 0

    runner = ScriptedRunner().on("/py", "-m", "venv", answer=make_venv)
    ctx = ctx_for(tmp_path, settings(full_ini()), runner)
    runner.on(str(ctx.root / "opt/dtake/venv/bin/python"), "-m", "pip", "install", answer=0)
    return ctx, runner, house, SoftwareStep(SoftwareSource(wheelhouse=house), python="/py")


def test_software_offline_install_commands(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    ctx, runner, house, step = _software_from_wheelhouse(tmp_path, full_ini)
    assert step.plan(ctx).summary == "install dtake into /opt/dtake/venv"
    step.apply(ctx, Transaction())
    pip = next(c for c in runner.calls if "pip" in c)
    assert pip[4:8] == ("--no-index", "--find-links", str(house), "--disable-pip-version-check")
    assert pip[-1] == "dtake"
    assert not SoftwareStep(SoftwareSource(wheelhouse=house), python="/py").plan(ctx).changed
    assert not SoftwareStep(None).plan(ctx).changed  # installed, no new source: leave it
    (house / "dtake-0.1.0-py3-none-any.whl").write_bytes(b"a new build")
    assert SoftwareStep(SoftwareSource(wheelhouse=house)).plan(ctx).summary.startswith("reinstall")


def test_apply_with_scripted_groups_and_failed_pip_rolls_back(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    runner = ScriptedRunner().on("groupadd", answer=0).on("groupdel", answer=0)
    house = tmp_path / "wh"
    house.mkdir()
    opts = actions.ApplyOptions(
        host="h", root=root, wheelhouse=house, runner=runner, agents_dir=tmp_path / "none"
    )
    # creating the venv is not scripted: it fails (rc 127) after the folders were made
    result = actions.apply(full_ini(), opts)
    assert result.exit_code == 1
    assert [s.status for s in result.steps][:2] == ["rolled_back", "failed"]
    assert list(root.iterdir()) == []  # nothing left
    assert runner.ran("groupadd") is False  # groups come after software: never reached


def test_supervisor_log_removed_on_rollback(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    """The supervisor creates its log when it starts; a rollback stops it and removes the
    log it made (found by the real apply in a namespace box: /var/log/dtake stayed)."""
    runner = ScriptedRunner()
    s = settings(full_ini())
    ctx = ctx_for(tmp_path, s, runner, init="supervisor")
    log = ctx.host("/var/log/dtake/supervisor.log")
    order: list[str] = []

    def start(argv: tuple[str, ...], input: str | None) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("started\n")
        return 0

    def stop(argv: tuple[str, ...], input: str | None) -> int:
        order.append("stop" if log.exists() else "stop after the log was removed")
        return 0

    step = ServiceStep(python="py")
    script = str(ctx.host(step.script_path(ctx)))
    runner.on("py", script, "start", answer=start).on("py", script, "stop", answer=stop)
    txn = Transaction()
    step.apply(ctx, txn)
    assert log.exists()
    assert txn.rollback() == []
    assert order == ["stop"] and not log.exists()


def test_existing_supervisor_log_kept_on_rollback(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    ctx = ctx_for(tmp_path, settings(full_ini()), ScriptedRunner(), init="supervisor")
    log = ctx.host("/var/log/dtake/supervisor.log")
    log.parent.mkdir(parents=True)
    log.write_text("an earlier run\n")
    txn = Transaction()
    txn.expect_file(log)
    log.write_text("an earlier run\nand this one\n")
    txn.rollback()
    assert log.exists()  # not ours to remove: it was there before


class FakePortFirewall:
    """firewalld or ufw as a set of open "port/proto" strings, driven by the exact command
    lines dtsetup sends (scripted: no firewalld or ufw runs on the test machine)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.open: set[str] = set()
        self.permanent: set[str] = set()

    def install(self, runner: ScriptedRunner) -> None:
        if self.kind == "firewalld":
            runner.on("firewall-cmd", answer=self.firewall_cmd)
        else:
            runner.on("ufw", answer=self.ufw)

    def firewall_cmd(self, argv: tuple[str, ...], input: str | None) -> int:
        args = list(argv[1:])
        target = self.open
        if args[0] == "--permanent":
            target, args = self.permanent, args[1:]
        for arg in args:
            verb, spec = arg[2:].split("=", 1)
            if verb == "query-port":
                return 0 if spec in self.open else 1
            (target.add if verb == "add-port" else target.discard)(spec)
        return 0

    def ufw(self, argv: tuple[str, ...], input: str | None) -> Completed:
        if argv[1:] == ("status",):
            rows = "".join(f"{spec:<12} ALLOW       Anywhere\n" for spec in sorted(self.open))
            return Completed(argv, 0, "Status: active\n\nTo Action From\n" + rows)
        if argv[1] == "allow":
            self.open.add(argv[2])
        elif argv[1:3] == ("delete", "allow"):
            self.open.discard(argv[3])
        return Completed(argv, 0)


@pytest.mark.parametrize("kind", ["firewalld", "ufw"])
def test_firewalld_ufw_open_move_close_and_undo(
    tmp_path: Path, full_ini: Callable[..., Path], kind: str
) -> None:
    """Open, then a new PORT (old one closed), then SET_FWPORT=N, then an undone apply:
    the same life cycle the nftables table goes through for real in the namespace test."""
    runner, fw = ScriptedRunner(), FakePortFirewall(kind)
    fw.install(runner)
    ctx = ctx_for(tmp_path, settings(full_ini()), runner)
    FirewallStep(backend=kind).apply(ctx, Transaction())
    assert fw.open == {"6320/tcp", "6320/udp"}
    assert not FirewallStep(backend=kind).plan(ctx).changed
    if kind == "firewalld":
        assert fw.permanent == fw.open  # survives a firewalld reload/reboot

    previous = {"installed": {"firewall": {"backend": kind, "port": 6320}}}
    moved = ctx_for(tmp_path, settings(full_ini(PORT="7000")), runner, previous=previous)
    step = FirewallStep(backend=kind)
    assert step.plan(moved).summary == f"remove 6320/tcp+udp ({kind}); add 7000/tcp+udp ({kind})"
    step.apply(moved, Transaction())
    assert fw.open == {"7000/tcp", "7000/udp"}

    previous = {"installed": {"firewall": {"backend": kind, "port": 7000}}}
    off = ctx_for(tmp_path, settings(full_ini(SET_FWPORT="N")), runner, previous=previous)
    txn = Transaction()
    FirewallStep(backend=kind).apply(off, txn)
    assert fw.open == set()
    assert txn.rollback() == []  # a later step failed: the port is open again
    assert fw.open == {"7000/tcp", "7000/udp"}
    assert runner.unexpected == []


def test_stale_control_socket_removed_by_transaction(tmp_path: Path) -> None:
    """The service leaves its control socket behind on exit; uninstall removes it like a
    file (there is no content to keep for a rollback)."""
    import socket as socketlib

    path = tmp_path / "dtake.sock"
    with socketlib.socket(socketlib.AF_UNIX) as s:
        s.bind(str(path))
    txn = Transaction()
    txn.remove_file(path)
    assert not path.exists()
    assert txn.rollback() == []  # nothing to restore, and no error


def test_supervisor_install_records_log_and_socket(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    ctx = ctx_for(tmp_path, settings(full_ini()), ScriptedRunner(), init="supervisor")
    files = ServiceStep().installed(ctx)["files"]
    assert "/var/log/dtake/supervisor.log" in files and "/run/dtake/dtake.sock" in files


def _installed_venv(tmp_path: Path, full_ini: Callable[..., Path]) -> tuple[Context, Path]:
    ctx, _, house, step = _software_from_wheelhouse(tmp_path, full_ini)
    assert step.plan(ctx).changed
    step.apply(ctx, Transaction())
    return ctx, house


def test_noop_software_plan_stats_without_hashing(
    tmp_path: Path, full_ini: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, house = _installed_venv(tmp_path, full_ini)
    marker = (ctx.root / "opt/dtake/venv/.dtsetup-software").read_text().splitlines()
    assert len(marker[0]) == 64 and marker[1].startswith("stat:")

    def no_hashing(self: SoftwareSource) -> str:
        raise AssertionError("hashed the wheels although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(SoftwareSource, "digest", no_hashing)
        assert not SoftwareStep(SoftwareSource(wheelhouse=house)).plan(ctx).changed

    wheel = house / "dtake-0.1.0-py3-none-any.whl"
    os.utime(wheel, ns=(1, 1))  # touched, same bytes: hashed, and still nothing to do
    assert not SoftwareStep(SoftwareSource(wheelhouse=house)).plan(ctx).changed
    wheel.write_bytes(b"wheel two")  # same size, new bytes, new mtime: reinstall
    assert SoftwareStep(SoftwareSource(wheelhouse=house)).plan(ctx).summary.startswith("reinstall")


def test_marker_without_stat_line_still_matches(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    """A venv installed before the stat check (the marker holds only the digest) is not
    reinstalled: the digest decides."""
    ctx, house = _installed_venv(tmp_path, full_ini)
    marker = ctx.root / "opt/dtake/venv/.dtsetup-software"
    marker.write_text(marker.read_text().splitlines()[0])
    assert not SoftwareStep(SoftwareSource(wheelhouse=house)).plan(ctx).changed

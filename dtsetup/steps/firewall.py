"""The firewall port for SET_FWPORT=Y, through whichever of firewalld, ufw or nftables is
in use. TCP and UDP: heartbeats and the service-monitor ping are UDP (reference §1.1).

nftables gets its own table ``inet dtake`` (removed on uninstall), replaced atomically in
one ``nft -f`` transaction. It only accepts: a drop in another table still wins, as
nftables evaluates every base chain of a hook (documented in docs/dtsetup.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from dtsetup import paths
from dtsetup.reports import Code
from dtsetup.runner import Runner
from dtsetup.steps.base import Change, Context, StepError
from dtsetup.txn import Transaction

__all__ = ["BACKENDS", "FirewallStep", "detect_backend"]


class Backend(Protocol):
    name: str

    def present(self, runner: Runner, port: int) -> bool: ...

    def add(self, runner: Runner, port: int) -> None: ...

    def remove(self, runner: Runner, port: int) -> None: ...


class Nftables:
    name = "nftables"

    def ruleset(self, port: int) -> str:
        t = paths.NFT_TABLE
        # "table" first so that "delete" never fails: the whole file is one transaction.
        return (
            f"table inet {t}\n"
            f"delete table inet {t}\n"
            f"table inet {t} {{\n"
            "  chain input {\n"
            "    type filter hook input priority filter; policy accept;\n"
            f'    tcp dport {port} accept comment "dtake"\n'
            f'    udp dport {port} accept comment "dtake"\n'
            "  }\n"
            "}\n"
        )

    def present(self, runner: Runner, port: int) -> bool:
        listing = runner.run(["nft", "list", "table", "inet", paths.NFT_TABLE])
        if not listing.ok:
            return False
        ports = set(re.findall(r"\b(tcp|udp) dport (\d+) accept", listing.stdout))
        return ports == {("tcp", str(port)), ("udp", str(port))}

    def add(self, runner: Runner, port: int) -> None:
        runner.run(["nft", "-f", "-"], input=self.ruleset(port), check=True)

    def remove(self, runner: Runner, port: int) -> None:
        if runner.run(["nft", "list", "table", "inet", paths.NFT_TABLE]).ok:
            runner.run(["nft", "delete", "table", "inet", paths.NFT_TABLE], check=True)


class Firewalld:
    name = "firewalld"

    def present(self, runner: Runner, port: int) -> bool:
        return all(
            runner.run(["firewall-cmd", f"--query-port={port}/{proto}"]).ok
            for proto in ("tcp", "udp")
        )

    def _change(self, runner: Runner, verb: str, port: int) -> None:
        specs = [f"--{verb}-port={port}/{proto}" for proto in ("tcp", "udp")]
        runner.run(["firewall-cmd", "--permanent", *specs], check=True)
        runner.run(["firewall-cmd", *specs], check=True)

    def add(self, runner: Runner, port: int) -> None:
        self._change(runner, "add", port)

    def remove(self, runner: Runner, port: int) -> None:
        self._change(runner, "remove", port)


class Ufw:
    name = "ufw"

    def present(self, runner: Runner, port: int) -> bool:
        status = runner.run(["ufw", "status"]).stdout
        return all(
            re.search(rf"^{port}/{proto}\s+ALLOW\b", status, re.MULTILINE)
            for proto in ("tcp", "udp")
        )

    def add(self, runner: Runner, port: int) -> None:
        for proto in ("tcp", "udp"):
            runner.run(["ufw", "allow", f"{port}/{proto}", "comment", "dtake"], check=True)

    def remove(self, runner: Runner, port: int) -> None:
        for proto in ("tcp", "udp"):
            runner.run(["ufw", "delete", "allow", f"{port}/{proto}"], check=True)


BACKENDS: dict[str, Backend] = {b.name: b for b in (Nftables(), Firewalld(), Ufw())}


def detect_backend(runner: Runner) -> str | None:
    """The firewall in use: firewalld if running, else ufw if active, else nftables if
    the nft tool exists, else None."""
    if runner.which("firewall-cmd") and runner.run(["firewall-cmd", "--state"]).ok:
        return "firewalld"
    if runner.which("ufw") and "Status: active" in runner.run(["ufw", "status"]).stdout:
        return "ufw"
    if runner.which("nft"):
        return "nftables"
    return None


class FirewallStep:
    name = "firewall"

    def __init__(self, *, backend: str | None, reason: str = "", required: bool = False) -> None:
        """``required``: the backend was auto-detected on the live host, so finding none
        is an error when SET_FWPORT=Y (rather than a deliberate ``--firewall none``)."""
        self.backend_name = backend
        self.reason = reason
        self.required = required

    def _work(self, ctx: Context) -> list[tuple[str, int]]:
        """(verb, port) pairs to do: add the wanted port, remove a previous one we opened."""
        s = ctx.settings
        if self.backend_name is None:
            return []
        backend = BACKENDS[self.backend_name]
        want = s.set_fw_port and s.server
        previous = ctx.previous_installed("firewall") or {}
        work: list[tuple[str, int]] = []
        old_port: int | None = previous.get("port")
        same_backend = previous.get("backend") == self.backend_name
        stale = old_port is not None and same_backend and (not want or old_port != s.port)
        if stale and old_port is not None and backend.present(ctx.runner, old_port):
            work.append(("remove", old_port))
        if want and not backend.present(ctx.runner, s.port):
            work.append(("add", s.port))
        return work

    def plan(self, ctx: Context) -> Change:
        wanted = ctx.settings.set_fw_port and ctx.settings.server
        if self.backend_name is None:
            if wanted and self.required:
                raise StepError(
                    Code.NO_FIREWALL_BACKEND,
                    "SET_FWPORT=Y but none of firewalld, ufw or nftables is in use "
                    "(or pass --firewall none)",
                )
            return Change(changed=False, skipped=True, summary=self.reason or "firewall left alone")
        work = self._work(ctx)
        summary = "; ".join(f"{verb} {port}/tcp+udp ({self.backend_name})" for verb, port in work)
        return Change(changed=bool(work), summary=summary)

    def apply(self, ctx: Context, txn: Transaction) -> None:
        if self.backend_name is None:
            return
        backend = BACKENDS[self.backend_name]
        for verb, port in self._work(ctx):
            if verb == "add":
                backend.add(ctx.runner, port)
                txn.on_undo(f"close {port}", _call(backend.remove, ctx.runner, port))
            else:
                backend.remove(ctx.runner, port)
                txn.on_undo(f"reopen {port}", _call(backend.add, ctx.runner, port))

    def installed(self, ctx: Context) -> dict[str, Any]:
        s = ctx.settings
        if self.backend_name is None or not (s.set_fw_port and s.server):
            return {"firewall": None}
        return {"firewall": {"backend": self.backend_name, "port": s.port}}


def _call(fn: Callable[[Runner, int], None], runner: Runner, port: int) -> Callable[[], None]:
    return lambda: fn(runner, port)

"""upgrade: the seed's rolling cluster upgrade [L503-507], with standby as the mover.

0. Plan: a check-mode deploy of the new wheelhouse on every host says which hosts need
   it. None: nothing is touched (a second run changes nothing). A host that cannot be
   planned (unreachable, dtsetup error) stops the run before anything changed. Then the
   peer protocol check: the new build's range [MIN, MAX] (read from its wheel) must
   overlap the range each host to upgrade runs now (``dtake --json status``, its
   ``protocol`` key; a status without it is a build that speaks protocol 1 only), else
   old and upgraded nodes could not replicate during the roll and the run is refused
   before anything changed, unless ``allow_protocol_break`` (then a warning, and the roll
   runs; its resync gate stops it before the move: see docs/playbooks.md).
1. "Move all cluster resources to one node": the node that is active now (it holds the
   promoted instances, else the most resources) stays; the other nodes to upgrade go to
   standby.
2. "Upgrade ... on all of the other nodes": deploy (dtsetup) to them, take them out of
   standby, and wait until they have resynced: every target instance of a promotable
   resource has a promotion score, dtake's copies report ``good`` and the promoted copy
   "The status of all targets is OK." (``crm_mon -A``). Moving before that would leave no
   copy fit to promote (online pending).
3. "Move the cluster resources to one of the upgraded nodes": standby the held node;
   pacemaker demotes/stops there and promotes/starts on an upgraded node. If nothing was
   promoted elsewhere, the held node leaves standby again (it keeps the resources) and the
   run fails.
4. "Upgrade ... on the last node", then out of standby: it rejoins as a target and resyncs.
5. "If needed, move the cluster resources": left to the operator (resources stay put).

A failure stops the roll where it is and is reported; a node whose upgrade failed stays
in standby, and the resources stay where they run.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable
from typing import TypeVar

from playbooks.deploy import DeployOptions, _host
from playbooks.pacemaker import CRM_MON_ATTRS, Status, parse_crm_mon, status
from playbooks.recap import CHANGED, FAILED, OK, SKIPPED, HostResult, PlaybookResult
from playbooks.remote import Connector, Remote, run_hosts
from playbooks.reports import WARNING, Finding
from playbooks.wheelhouse import manifest, wheel_protocol

__all__ = [
    "DTAKE_BIN",
    "LEGACY_PROTOCOL",
    "OK_TEXT",
    "NotInSync",
    "in_sync",
    "status_protocol",
    "upgrade",
    "wait_in_sync",
]

OK_TEXT = "The status of all targets is OK."
PROMOTED = ("Promoted", "Master")
T = TypeVar("T")
DTAKE_BIN = "/opt/dtake/venv/bin/dtake"  # <DOUBLETAKEFOLDER>/venv/bin/dtake
# The range of a node whose status has no "protocol" key: builds before that key speak
# protocol 1 only (every build that speaks 2 reports the key).
LEGACY_PROTOCOL = (1, 1)
NOT_FOUND = 127  # the shell's "command not found": dtake is not installed there


class NotInSync(Exception):
    """The target copies did not resync in time; ``promoted`` is the source node."""

    def __init__(self, why: str, promoted: list[str]) -> None:
        super().__init__(why)
        self.promoted = promoted


def _standby(remote: Remote, node: str, on: bool) -> None:
    remote.run(
        f"crm_attribute --node {shlex.quote(node)} --name standby --update "
        f"{'on' if on else 'off'} --lifetime forever",
        check=True,
    )


def _settle(remote: Remote, timeout: float = 300) -> None:
    remote.run(f"crm_resource --wait --timeout={int(timeout)}s", timeout=timeout + 30, check=True)


def _active_node(st: Status, hosts: list[str]) -> str:
    for roles in st.roles.values():
        for node, role in roles.items():
            if role in PROMOTED and node in hosts:
                return node
    counts = {h: sum(1 for r in st.roles.values() if h in r) for h in hosts}
    return max(hosts, key=lambda h: counts[h])


def in_sync(st: Status) -> str | None:
    """None when every promotable resource has one promoted copy and every target copy
    could take over; else what is still missing (for the message)."""
    for rid in sorted(st.promotable):
        roles = st.roles.get(rid, {})
        promoted = [n for n, r in roles.items() if r in PROMOTED]
        if len(promoted) != 1:
            return f"{rid}: promoted on {promoted or 'no node'}"
        dtake = ":dtake:" in st.agents.get(rid, "")
        if dtake:
            text = st.attrs.get(promoted[0], {}).get(f"dtake-{rid}-status", "")
            if text != OK_TEXT:
                return f"{rid} on {promoted[0]}: {text or 'no status yet'}"
        for node, role in sorted(roles.items()):
            if role in PROMOTED:
                continue
            a = st.attrs.get(node, {})
            if not a.get(f"master-{rid}", "").lstrip("-").isdigit():
                return f"{rid} on {node}: no promotion score yet"
            if dtake and a.get(f"dtake-{rid}-state") != "good":
                return f"{rid} on {node}: data {a.get(f'dtake-{rid}-state') or 'unknown'}"
    return None


def wait_in_sync(remote: Remote, timeout: float) -> None:
    """Until ``in_sync`` (via REMOTE's crm_mon); NotInSync with the last reason."""
    deadline = time.monotonic() + timeout
    why, promoted = "no answer from crm_mon", []
    while True:
        r = remote.run(CRM_MON_ATTRS, timeout=30)
        if r.ok:
            st = parse_crm_mon(r.stdout)
            missing = in_sync(st)
            if missing is None:
                return
            why = missing
            promoted = sorted({n for rid in st.promotable for n in st.promoted(rid)})
        if time.monotonic() >= deadline:
            raise NotInSync(f"targets not in sync within {timeout:.0f}s: {why}", promoted)
        time.sleep(1.0)


def _connection_errors(connect: Connector, node: str, dtake_bin: str) -> str:
    """The replication errors the source node reports (why its targets do not resync)."""
    try:
        remote = connect(node)
    except Exception:
        return ""
    try:
        r = remote.run(f"{shlex.quote(dtake_bin)} --json status", timeout=30)
        conns = json.loads(r.stdout).get("connections", []) if r.ok else []
    except Exception:
        return ""
    finally:
        remote.close()
    errors = [f"{c.get('target')}: {c['last_error']}" for c in conns if c.get("last_error")]
    return f"; connection errors on {node}: " + "; ".join(errors) if errors else ""


def status_protocol(status: dict[str, object]) -> tuple[int, int]:
    """The peer protocol range [MIN, MAX] a node runs, from its ``dtake --json status``;
    ValueError for a malformed value."""
    p = status.get("protocol")
    if p is None:
        return LEGACY_PROTOCOL
    if isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p) and 1 <= p[0] <= p[1]:
        return p[0], p[1]
    raise ValueError(f"unexpected protocol value {p!r}")


def _fmt(r: tuple[int, int]) -> str:
    return f"[{r[0]}, {r[1]}]"


def _running_protocol(remote: Remote, dtake_bin: str) -> tuple[tuple[int, int] | None, str]:
    """Read-only: (the protocol range the node runs, what to say). The range is None when
    dtake is not installed there (the text says so) or cannot be told (the text starts
    with "cannot tell")."""
    r = remote.run(f"{shlex.quote(dtake_bin)} --json status", timeout=30)
    if r.rc == NOT_FOUND:
        return None, f"{dtake_bin} not installed: no old build to replicate with"
    if not r.ok:
        return None, f"cannot tell its protocol: `dtake --json status` exited {r.rc}: {r.tail()}"
    try:
        st = json.loads(r.stdout)
        if not isinstance(st, dict):
            raise ValueError("not a JSON object")
        running = status_protocol(st)
    except ValueError as e:
        return None, f"cannot tell its protocol: `dtake --json status`: {e}"
    version = f"dtake {st['version']}, " if isinstance(st.get("version"), str) else ""
    return running, f"runs {version}protocol {_fmt(running)}"


def upgrade(
    hosts: list[str],
    connect: Connector,
    o: DeployOptions,
    *,
    sync_timeout: float = 600.0,
    settle_timeout: float = 300.0,
    dtake_bin: str = DTAKE_BIN,
    allow_protocol_break: bool = False,
) -> PlaybookResult:
    t0 = time.monotonic()
    result = PlaybookResult("upgrade")
    wheels = manifest(o.wheelhouse)
    if not wheels:
        result.findings.append(Finding("NO_WHEELS", f"no wheels in {o.wheelhouse}"))
        return result
    try:
        new_protocol = wheel_protocol(o.wheelhouse)
    except ValueError as e:
        msg = f"cannot read the new build's peer protocol range: {e}"
        result.findings.append(Finding("NO_PROTOCOL", msg))
        return result
    per_host = {h: HostResult(h) for h in hosts}
    result.hosts = list(per_host.values())

    def deploy_to(nodes: list[str], opts: DeployOptions) -> dict[str, HostResult]:
        return {
            r.host: r
            for r in run_hosts(
                nodes,
                connect,
                lambda rm, res: _host(rm, res, opts, wheels),
                forks=o.forks,
                host_timeout=o.host_timeout,
            )
        }

    def upgrade_nodes(nodes: list[str]) -> bool:
        for h, r in deploy_to(nodes, o).items():
            per_host[h].tasks.extend(r.tasks)
            per_host[h].unreachable = r.unreachable
        return not any(per_host[n].failed for n in nodes)

    def control(fn: Callable[[Remote], T]) -> T:
        """Pacemaker steps through a fresh connection to the first host: each phase gets
        the per-host deadline (the whole roll may take longer than one host's)."""
        remote = connect(hosts[0])
        try:
            return fn(remote)
        finally:
            remote.close()

    def standby(nodes: list[str], on: bool, why: str = "") -> None:
        def go(remote: Remote) -> None:
            for n in nodes:
                _standby(remote, n, on)
                per_host[n].add(f"standby {'on' if on else 'off'}", CHANGED, why)
            _settle(remote, settle_timeout)

        control(go)

    def resynced(nodes: list[str], blame: str, stage: str) -> bool:
        """Wait until every target copy could take over; a timeout is a failure on BLAME
        with the reason and the source's replication errors."""
        try:
            control(lambda remote: wait_in_sync(remote, sync_timeout))
        except NotInSync as e:
            why = str(e)
            for src in e.promoted:
                why += _connection_errors(connect, src, dtake_bin)
            per_host[blame].add("resync", FAILED, f"{stage}: {why}")
            return False
        for n in nodes:
            per_host[n].add("resync", OK, "target copies in sync")
        return True

    def move(remote: Remote, hold: str) -> tuple[Status, Status]:
        before = status(remote)
        _standby(remote, hold, True)
        _settle(remote, settle_timeout)
        return before, status(remote)

    def roll(needs: list[str]) -> None:
        hold = _active_node(control(status), hosts)
        others = [h for h in needs if h != hold]
        # 1.-2. the others, while the active node keeps the resources
        if others:
            standby(others, True, f"resources stay on {hold}")
            if not upgrade_nodes(others):
                bad = [n for n in others if per_host[n].failed]
                good = [n for n in others if n not in bad]
                if good:
                    standby(good, False)
                per_host[hold].add(
                    "upgrade",
                    FAILED,
                    f"stopped: the upgrade of {', '.join(bad)} failed (left in standby); "
                    f"resources stay on {hold}",
                )
                return
            standby(others, False)
            if not resynced(others, hold, f"stopped before the move, resources stay on {hold}"):
                return
        if hold not in needs:
            return
        # 3. move the resources to an upgraded node (resynced: it can take over)
        if not others and not resynced([], hold, "stopped before the move"):
            return
        before, after = control(lambda remote: move(remote, hold))
        stuck = [
            rid
            for rid, roles in before.roles.items()
            if roles.get(hold) in PROMOTED and not [n for n in after.promoted(rid) if n != hold]
        ]
        if stuck:
            standby([hold], False, "nothing was promoted elsewhere: the resources stay")
            per_host[hold].add(
                "move resources",
                FAILED,
                f"{', '.join(stuck)} not promoted on an upgraded node: left on {hold}, "
                "which is not upgraded",
            )
            return
        dest = sorted({n for rid in before.promotable for n in after.promoted(rid)}) or [
            n for n in hosts if n != hold
        ]
        per_host[hold].add("move resources", CHANGED, f"standby on; now active: {', '.join(dest)}")
        # 4. the last node, then back as a target
        if not upgrade_nodes([hold]):
            return
        standby([hold], False)
        resynced([hold], hold, "the last node rejoined")

    def protocol_ok(needs: list[str]) -> bool:
        """0b. Can the hosts to upgrade replicate with the new build (read-only)? False:
        the run stops here, nothing changed (a refusal, or a host that went away)."""
        running: dict[str, tuple[tuple[int, int] | None, str]] = {}

        def probe(remote: Remote, res: HostResult) -> None:
            running[res.host] = _running_protocol(remote, dtake_bin)

        probed = {
            r.host: r
            for r in run_hosts(needs, connect, probe, forks=o.forks, host_timeout=o.host_timeout)
        }
        gone = [h for h in needs if probed[h].failed or h not in running]
        if gone:  # unreachable now, or the probe itself failed: stop as the plan does
            for h in hosts:
                if h in gone:
                    per_host[h].unreachable = probed[h].unreachable
                    per_host[h].tasks.extend(t for t in probed[h].tasks if t.status == FAILED)
                else:
                    per_host[h].add("upgrade", SKIPPED, f"not started: {', '.join(gone)} failed")
            return False
        new = _fmt(new_protocol)
        breaks: dict[str, str] = {}
        for h in needs:
            rng, text = running[h]
            if rng is None and not text.startswith("cannot tell"):
                per_host[h].add("protocol", OK, text)
            elif rng is not None and max(rng[0], new_protocol[0]) <= min(rng[1], new_protocol[1]):
                per_host[h].add("protocol", OK, f"{text}, the new build {new}")
            else:
                breaks[h] = text
        # what each refused (or allowed) host's task says
        verdict = {
            h: f"{m}, the new build {new}: no common version" if running[h][0] else m
            for h, m in breaks.items()
        }
        if not breaks:
            return True
        grouped: dict[str, list[str]] = {}
        for h, text in breaks.items():
            grouped.setdefault(text, []).append(h)
        why = (
            f"no common peer protocol version between the new build ({new}) and "
            + "; ".join(f"{', '.join(hs)} ({text})" for text, hs in grouped.items())
            + ": old and upgraded nodes could not replicate during the roll (the resync gate "
            "would stop it before the move, with replication broken)"
        )
        if allow_protocol_break:
            result.findings.append(
                Finding(
                    "PROTOCOL_BREAK",
                    f"{why}. --allow-protocol-break: rolling anyway; replication between "
                    f"the old build on {', '.join(breaks)} and the upgraded nodes pauses "
                    "until the last node is upgraded, so the resync gate may stop the roll "
                    "before the move: finish and check as docs/playbooks.md (upgrade) says",
                    severity=WARNING,
                )
            )
            for h in breaks:
                per_host[h].add("protocol", OK, f"{verdict[h]} (--allow-protocol-break)")
            return True
        result.findings.append(
            Finding(
                "PROTOCOL_BREAK",
                f"{why}. Nothing was changed; upgrade in a maintenance window or pass "
                "--allow-protocol-break (docs/playbooks.md, upgrade)",
            )
        )
        for h in hosts:
            if h in breaks:
                per_host[h].add("protocol", FAILED, f"{verdict[h]}: refused, nothing changed")
            else:
                per_host[h].add("upgrade", SKIPPED, "not started: peer protocol break")
        return False

    # 0. plan: who is not on the wheelhouse's version yet (check mode writes nothing)
    plan = deploy_to(hosts, dataclasses.replace(o, check=True, diff=False, retry_file=None))
    unplanned = [h for h in hosts if plan[h].failed]
    if unplanned:
        for h in unplanned:
            per_host[h].unreachable = plan[h].unreachable
            per_host[h].tasks.extend(t for t in plan[h].tasks if t.status == FAILED)
        for h in hosts:
            if h not in unplanned:
                per_host[h].add("upgrade", SKIPPED, f"not started: {', '.join(unplanned)} failed")
        result.seconds = time.monotonic() - t0
        return result
    needs = [h for h in hosts if plan[h].changed]
    for h in hosts:
        if h not in needs:
            per_host[h].add("version", OK, "already installed from this wheelhouse")
    if needs and not protocol_ok(needs):
        result.seconds = time.monotonic() - t0
        return result
    try:
        if needs:
            roll(needs)
    except Exception as e:
        per_host[hosts[0]].add("upgrade", FAILED, f"{type(e).__name__}: {e}")
    result.seconds = time.monotonic() - t0
    return result

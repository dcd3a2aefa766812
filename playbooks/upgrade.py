"""upgrade: the seed's rolling cluster upgrade [L503-507], with standby as the mover.

0. Plan: a check-mode deploy of the new wheelhouse on every host says which hosts need
   it. None: nothing is touched (a second run changes nothing). A host that cannot be
   planned (unreachable, dtsetup error) stops the run before anything changed.
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
import shlex
import time

from playbooks.deploy import DeployOptions, _host
from playbooks.pacemaker import Status, status
from playbooks.recap import CHANGED, FAILED, OK, SKIPPED, HostResult, PlaybookResult
from playbooks.remote import Connector, HostTimeout, Remote, run_hosts
from playbooks.reports import Finding
from playbooks.wheelhouse import manifest

__all__ = ["OK_TEXT", "in_sync", "upgrade"]

OK_TEXT = "The status of all targets is OK."
PROMOTED = ("Promoted", "Master")


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


def _wait_in_sync(remote: Remote, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    why = "no answer"
    while time.monotonic() < deadline:
        r = remote.run("crm_mon --output-as xml --inactive -A", timeout=30)
        if r.ok:
            from playbooks.pacemaker import parse_crm_mon

            missing = in_sync(parse_crm_mon(r.stdout))
            if missing is None:
                return
            why = missing
        time.sleep(1.0)
    raise HostTimeout(f"targets not in sync within {timeout:.0f}s ({why})")


def upgrade(
    hosts: list[str],
    connect: Connector,
    o: DeployOptions,
    *,
    sync_timeout: float = 600.0,
    settle_timeout: float = 300.0,
) -> PlaybookResult:
    t0 = time.monotonic()
    result = PlaybookResult("upgrade")
    wheels = manifest(o.wheelhouse)
    if not wheels:
        result.findings.append(Finding("NO_WHEELS", f"no wheels in {o.wheelhouse}"))
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
    if not needs:
        result.seconds = time.monotonic() - t0
        return result

    ctl = connect(hosts[0])
    try:
        hold = _active_node(status(ctl), hosts)
        others = [h for h in needs if h != hold]
        # 1.-2. the others, while the active node keeps the resources
        if others:
            for n in others:
                _standby(ctl, n, True)
                per_host[n].add("standby on", CHANGED, f"resources stay on {hold}")
            _settle(ctl, settle_timeout)
            if not upgrade_nodes(others):
                bad = [n for n in others if per_host[n].failed]
                for n in others:
                    if n not in bad:
                        _standby(ctl, n, False)
                        per_host[n].add("standby off", CHANGED)
                per_host[hold].add(
                    "upgrade",
                    FAILED,
                    f"stopped: the upgrade of {', '.join(bad)} failed (left in standby); "
                    f"resources stay on {hold}",
                )
                return result
            for n in others:
                _standby(ctl, n, False)
                per_host[n].add("standby off", CHANGED)
            _settle(ctl, settle_timeout)
            _wait_in_sync(ctl, sync_timeout)
            for n in others:
                per_host[n].add("resync", OK, "target copies in sync")
        if hold not in needs:
            return result
        # 3. move the resources to an upgraded node
        _wait_in_sync(ctl, sync_timeout)
        before = status(ctl)
        _standby(ctl, hold, True)
        _settle(ctl, settle_timeout)
        after = status(ctl)
        stuck = [
            rid
            for rid, roles in before.roles.items()
            if roles.get(hold) in PROMOTED and not [n for n in after.promoted(rid) if n != hold]
        ]
        if stuck:
            _standby(ctl, hold, False)
            _settle(ctl, settle_timeout)
            per_host[hold].add(
                "move resources",
                FAILED,
                f"{', '.join(stuck)} not promoted on an upgraded node: left on {hold}, "
                "which is not upgraded",
            )
            return result
        dest = sorted({n for rid in before.promotable for n in after.promoted(rid)}) or [
            n for n in hosts if n != hold
        ]
        per_host[hold].add("move resources", CHANGED, f"standby on; now active: {', '.join(dest)}")
        # 4. the last node
        if not upgrade_nodes([hold]):
            return result
        _standby(ctl, hold, False)
        per_host[hold].add("standby off", CHANGED)
        _settle(ctl, settle_timeout)
        _wait_in_sync(ctl, sync_timeout)
        per_host[hold].add("resync", OK, "target copy in sync")
    except Exception as e:
        per_host[hosts[0]].add("upgrade", FAILED, f"{type(e).__name__}: {e}")
    finally:
        ctl.close()
        result.seconds = time.monotonic() - t0
    return result

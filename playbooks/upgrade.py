"""upgrade: the seed's rolling cluster upgrade [L503-507], with standby as the mover.

1. "Move all cluster resources to one node": the node that is active now (it holds the
   promoted instances, else the most resources) stays; every other node goes to standby.
2. "Upgrade ... on all of the other nodes": deploy (dtsetup) to them, then take them out of
   standby and let them resync.
3. "Move the cluster resources to one of the upgraded nodes": standby the held node;
   pacemaker demotes/stops there and promotes/starts on an upgraded node.
4. "Upgrade ... on the last node", then out of standby: it rejoins as a target.
5. "If needed, move the cluster resources": left to the operator (resources stay put).

A failure stops the roll where it is, with the node left in standby, and is reported.
"""

from __future__ import annotations

import shlex
import time

from playbooks.deploy import DeployOptions, _host
from playbooks.pacemaker import status
from playbooks.recap import CHANGED, FAILED, HostResult, PlaybookResult
from playbooks.remote import Connector, Remote, run_hosts
from playbooks.wheelhouse import manifest

__all__ = ["upgrade"]


def _standby(remote: Remote, node: str, on: bool) -> None:
    remote.run(
        f"crm_attribute --node {shlex.quote(node)} --name standby --update "
        f"{'on' if on else 'off'} --lifetime forever",
        check=True,
    )


def _settle(remote: Remote, timeout: float = 300) -> None:
    remote.run(f"crm_resource --wait --timeout={int(timeout)}s", timeout=timeout + 30, check=True)


def _active_node(remote: Remote, hosts: list[str]) -> str:
    st = status(remote)
    for roles in st.roles.values():
        for node, role in roles.items():
            if role in ("Promoted", "Master") and node in hosts:
                return node
    counts = {h: sum(1 for r in st.roles.values() if h in r) for h in hosts}
    return max(hosts, key=lambda h: counts[h])


def upgrade(hosts: list[str], connect: Connector, o: DeployOptions) -> PlaybookResult:
    t0 = time.monotonic()
    result = PlaybookResult("upgrade")
    wheels = manifest(o.wheelhouse)
    per_host = {h: HostResult(h) for h in hosts}
    result.hosts = list(per_host.values())

    def deploy_to(nodes: list[str]) -> bool:
        for r in run_hosts(
            nodes,
            connect,
            lambda rm, res: _host(rm, res, o, wheels),
            forks=o.forks,
            host_timeout=o.host_timeout,
        ):
            tgt = per_host[r.host]
            tgt.tasks.extend(r.tasks)
            tgt.unreachable = r.unreachable
        return not any(per_host[n].failed for n in nodes)

    ctl = connect(hosts[0])
    try:
        hold = _active_node(ctl, hosts)
        others = [h for h in hosts if h != hold]
        for n in others:
            _standby(ctl, n, True)
        _settle(ctl)
        per_host[hold].add("hold resources", CHANGED, f"others in standby: {', '.join(others)}")
        if not deploy_to(others):
            per_host[hold].add("upgrade", FAILED, "stopped: an upgrade of the others failed")
            return result
        for n in others:
            _standby(ctl, n, False)
            per_host[n].add("standby off", CHANGED)
        _settle(ctl)
        _standby(ctl, hold, True)
        _settle(ctl)
        per_host[hold].add("move resources", CHANGED, "to an upgraded node (standby)")
        if not deploy_to([hold]):
            return result
        _standby(ctl, hold, False)
        _settle(ctl)
        per_host[hold].add("standby off", CHANGED)
    except Exception as e:
        per_host[hosts[0]].add("upgrade", FAILED, f"{type(e).__name__}: {e}")
    finally:
        ctl.close()
        result.seconds = time.monotonic() - t0
    return result

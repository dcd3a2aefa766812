"""cluster: form or converge a corosync/pacemaker cluster from a cluster spec.

1. facts (all nodes, parallel): corosync.conf, sha256 of /etc/corosync/authkey, whether
   corosync and pacemakerd run.
2. authkey: one key for all nodes. The key already on most nodes wins (an existing
   cluster keeps its key); with no key anywhere one is generated here. It travels only
   over the SSH channel, is written 0400 via a 0600 temp file and an atomic rename, and
   is never printed. Nodes that have it already are ``ok``.
3. corosync.conf: converged per node (playbooks.corosync); rewritten only when a value
   the spec governs differs. A running cluster takes nodelist/token/quorum changes with
   ``corosync-cfgtool -R``; a change that needs a restart (name, transport, crypto) is
   refused on a running cluster rather than done halfway.
4. start where not running (systemd hosts), wait for quorum and every node online
   (``crm_mon`` XML), then converge the cluster properties once, with ``crm_attribute``
   only for values that differ.
"""

from __future__ import annotations

import base64
import os
import shlex
import time
from dataclasses import dataclass

from playbooks import corosync
from playbooks.cib import live_properties
from playbooks.pacemaker import wait_for_cluster
from playbooks.recap import CHANGED, FAILED, OK, HostResult, PlaybookResult
from playbooks.remote import Connector, Remote, run_hosts
from playbooks.spec import ClusterSpec

__all__ = ["COROSYNC_CONF", "COROSYNC_KEY", "ClusterOptions", "cluster"]

COROSYNC_CONF = "/etc/corosync/corosync.conf"
COROSYNC_KEY = "/etc/corosync/authkey"


@dataclass
class ClusterOptions:
    check: bool = False
    diff: bool = False
    forks: int = 5
    host_timeout: float = 300.0
    wait_timeout: float = 120.0


@dataclass
class _Facts:
    conf: str | None
    key_sha: str
    corosync: bool
    pacemaker: bool


def _facts(remote: Remote) -> _Facts:
    conf = remote.run(f"cat {COROSYNC_CONF}")
    key = remote.run(f"sha256sum {COROSYNC_KEY} 2>/dev/null | cut -d' ' -f1; true")
    coro = remote.run("corosync-cfgtool -s >/dev/null 2>&1")
    pcmk = remote.run("crm_mon -1 --output-as xml >/dev/null 2>&1")
    return _Facts(conf.stdout if conf.ok else None, key.stdout.strip(), coro.ok, pcmk.ok)


def cluster(spec: ClusterSpec, connect: Connector, o: ClusterOptions) -> PlaybookResult:
    t0 = time.monotonic()
    result = PlaybookResult("cluster")
    hosts = spec.node_names
    facts: dict[str, _Facts] = {}

    def gather(remote: Remote, res: HostResult) -> None:
        facts[remote.host] = _facts(remote)
        f = facts[remote.host]
        res.add(
            "facts",
            OK,
            f"corosync={'up' if f.corosync else 'down'} pacemaker={'up' if f.pacemaker else 'down'}",
        )

    gathered = {h.host: h for h in run_hosts(hosts, connect, gather, forks=o.forks)}
    reachable = [h for h in hosts if h in facts]
    # the key: keep the one most nodes have (an existing cluster), else make one
    shas = [facts[h].key_sha for h in reachable if facts[h].key_sha]
    key: bytes | None = None
    key_sha = max(set(shas), key=shas.count) if shas else ""
    if key_sha:
        donor = next(h for h in reachable if facts[h].key_sha == key_sha)
        r = None
        remote = connect(donor)
        try:
            r = remote.run(f"base64 -w0 {COROSYNC_KEY}", check=True)
        finally:
            remote.close()
        key = base64.b64decode(r.stdout.strip())
    elif not o.check:
        key = os.urandom(256)
        import hashlib

        key_sha = hashlib.sha256(key).hexdigest()
    running = any(facts[h].corosync for h in reachable)

    def converge_host(remote: Remote, res: HostResult) -> None:
        f = facts[remote.host]
        # authkey
        if f.key_sha == key_sha and key_sha:
            res.add("corosync authkey", OK)
        elif o.check or key is None:
            res.add("corosync authkey", CHANGED, "would install the cluster key (0400)")
        else:
            remote.run("mkdir -p /etc/corosync", check=True)
            remote.put_bytes(key, COROSYNC_KEY, mode=0o400)
            res.add("corosync authkey", CHANGED, "installed the cluster key (0400)")
        # corosync.conf
        new, keys = corosync.converge(f.conf, spec)
        if new is None:
            res.add("corosync.conf", OK)
            return
        diff = ""
        if o.diff:
            import difflib

            diff = "".join(
                difflib.unified_diff(
                    (f.conf or "").splitlines(True), new.splitlines(True), "live", "spec"
                )
            )
        restart = [k for k in keys if k in corosync.RESTART_KEYS]
        if f.corosync and restart:
            res.add(
                "corosync.conf",
                FAILED,
                f"{', '.join(restart)} differ and need a cluster restart; stop the cluster "
                "and run again (nothing written)",
                diff,
            )
            return
        if o.check:
            res.add("corosync.conf", CHANGED, f"would set {', '.join(keys)}", diff)
            return
        remote.put_bytes(new.encode(), COROSYNC_CONF, mode=0o644)
        res.add("corosync.conf", CHANGED, f"set {', '.join(keys)}", diff)

    converged = {
        h.host: h
        for h in run_hosts(
            reachable, connect, converge_host, forks=o.forks, host_timeout=o.host_timeout
        )
    }
    result.hosts = [_merge(gathered[h], converged.get(h)) for h in hosts]
    if any(h.failed for h in result.hosts) or o.check:
        result.seconds = time.monotonic() - t0
        return result

    first = result.hosts[0]
    conf_changed = [
        h for h in result.hosts if any(t.name == "corosync.conf" and t.changed for t in h.tasks)
    ]
    remote = connect(first.host)
    try:
        if conf_changed and running:
            remote.run("corosync-cfgtool -R", check=True)
            first.add("corosync reload", CHANGED, "corosync-cfgtool -R")
        for h in result.hosts:
            if not facts[h.host].corosync or not facts[h.host].pacemaker:
                _start(connect, h)
        if any(h.failed for h in result.hosts):
            return result
        wait_for_cluster(remote, hosts, timeout=o.wait_timeout)
        first.add("membership", OK, f"{len(hosts)} nodes online, quorate")
        live = live_properties(remote.run("cibadmin --query", check=True).stdout)
        for name, value in sorted(spec.properties.items()):
            if live.get(name) == value:
                first.add(f"property {name}", OK)
                continue
            remote.run(
                f"crm_attribute --type crm_config --name {shlex.quote(name)} "
                f"--update {shlex.quote(value)}",
                check=True,
            )
            first.add(f"property {name}", CHANGED, f"{live.get(name, '(unset)')} -> {value}")
    except Exception as e:
        first.add("cluster", FAILED, f"{type(e).__name__}: {e}")
    finally:
        remote.close()
    result.seconds = time.monotonic() - t0
    return result


def _start(connect: Connector, h: HostResult) -> None:
    remote = connect(h.host)
    try:
        if not remote.run("test -d /run/systemd/system").ok:
            h.add(
                "start",
                FAILED,
                "corosync/pacemaker not running and no systemd here: start them, then rerun",
            )
            return
        remote.run("systemctl enable --now corosync pacemaker", check=True, timeout=120)
        h.add("start", CHANGED, "systemctl enable --now corosync pacemaker")
    finally:
        remote.close()


def _merge(a: HostResult, b: HostResult | None) -> HostResult:
    if b is None:
        return a
    a.tasks.extend(b.tasks)
    a.unreachable = a.unreachable or b.unreachable
    a.seconds += b.seconds
    return a

"""resources: converge the CIB's resources and constraints to the cluster spec.

Runs once, on the first reachable node of the spec (the CIB is cluster-wide; changing it
from one node avoids conflicting writes, as ha_cluster's ``run_once``):

1. ``cibadmin --query``; render the desired resources/constraints; diff (playbooks.cib).
2. No difference: every element ``ok``, nothing pushed.
3. Otherwise build the new CIB, check it with ``crm_verify --xml-file``, and push only the
   difference: ``crm_diff --no-version`` + ``cibadmin --patch``. A CIB that fails
   verification is not pushed (the host is ``failed``, the cluster unchanged).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass

from playbooks import cib
from playbooks.recap import CHANGED, FAILED, OK, HostResult, PlaybookResult
from playbooks.remote import Connector, HostTimeout, Remote, Unreachable
from playbooks.spec import ClusterSpec

__all__ = ["ResourcesOptions", "resources"]


@dataclass
class ResourcesOptions:
    check: bool = False
    diff: bool = False


def _diff_text(ch: cib.CibChange) -> str:
    out = []
    if ch.before:
        out.append(f"- {ch.before}")
    if ch.after:
        out.append(f"+ {ch.after}")
    return "\n".join(out)


def _converge(remote: Remote, res: HostResult, spec: ClusterSpec, o: ResourcesOptions) -> None:
    live = remote.run("cibadmin --query", check=True, timeout=60).stdout
    want_r = cib.desired_resources(spec)
    want_c = cib.desired_constraints(spec)
    changes = cib.diff_cib(live, want_r, want_c, prune=spec.prune)
    changed_ids = {(c.section, c.id) for c in changes}
    for section, wanted in (("resources", want_r), ("constraints", want_c)):
        for rid in wanted:
            if (section, rid) not in changed_ids:
                res.add(f"{section[:-1]} {rid}", OK)
    for ch in changes:
        res.add(
            f"{ch.section[:-1]} {ch.id}",
            CHANGED,
            ("would " if o.check else "") + ch.action,
            _diff_text(ch) if o.diff else "",
        )
    if not changes or o.check:
        return
    new = cib.apply_changes(live, changes, want_r, want_c)
    tmp = remote.run("mktemp -d /tmp/dtake-cib.XXXXXX", check=True).stdout.strip()
    q = shlex.quote
    try:
        remote.put_bytes(live.encode(), f"{tmp}/live.xml", mode=0o600)
        remote.put_bytes(new.encode(), f"{tmp}/new.xml", mode=0o600)
        v = remote.run(f"crm_verify --xml-file {q(tmp)}/new.xml", timeout=60)
        if not v.ok:
            res.add("cib verify", FAILED, f"crm_verify refused the new CIB: {v.tail(8)}")
            return
        d = remote.run(
            f"crm_diff --no-version --original {q(tmp)}/live.xml --new {q(tmp)}/new.xml "
            f"> {q(tmp)}/patch.xml",
            timeout=60,
        )
        if d.rc == 0:
            res.add("cib push", OK, "crm_diff found no difference")
            return
        if d.rc != 1:
            res.add("cib push", FAILED, f"crm_diff exited {d.rc}: {d.tail()}")
            return
        p = remote.run(f"cibadmin --patch --xml-file {q(tmp)}/patch.xml", timeout=120)
        if not p.ok:
            res.add("cib push", FAILED, f"cibadmin --patch exited {p.rc}: {p.tail()}")
            return
        res.add("cib push", CHANGED, f"{len(changes)} change(s) patched")
    finally:
        remote.run(f"rm -rf {q(tmp)}")


def resources(spec: ClusterSpec, connect: Connector, o: ResourcesOptions) -> PlaybookResult:
    t0 = time.monotonic()
    result = PlaybookResult("resources")
    for host in spec.node_names:
        res = HostResult(host)
        result.hosts.append(res)
        remote: Remote | None = None
        try:
            remote = connect(host)
            _converge(remote, res, spec, o)
            break
        except Unreachable as e:
            res.unreachable = str(e) or "unreachable"
        except HostTimeout as e:
            res.add("timeout", FAILED, str(e))
            break
        except Exception as e:
            res.add("error", FAILED, f"{type(e).__name__}: {e}")
            break
        finally:
            if remote is not None:
                remote.close()
            res.seconds = time.monotonic() - t0
    result.seconds = time.monotonic() - t0
    return result
